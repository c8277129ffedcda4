"""The output pipeline: one choice's tokens -> text -> what the answer says.

Between the engine and the routes, each choice goes through one `OutputPipeline`: the
detokenizer and the stop strings (`TextStream`), then an `OutputParser` that sorts the text
into content, reasoning (`reasoning_content`) and tool calls, and may end the choice with its
own finish reason ("tool_calls"). Streamed and non-streamed answers take the same path: a
non-streamed choice is its streamed deltas joined (`ChoiceOutput.add`), so the two agree.

Today's only parser passes text through as content. A reasoning parser (`<think>` ... `</think>`)
or a model family's tool-call parser is one `OutputParser` subclass: feed it text as it comes
(holding back a tail that may begin a tag), finish it at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from vlmserve.frontend.detokenizer import TextStream


@dataclass
class ToolCallDelta:
    """A piece of tool call `index` of a choice (calls count from 0, in order): its first piece
    names it (`id`, `name`); later ones carry more of its JSON `arguments`, as OpenAI streams
    them."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class OutputDelta:
    """What a piece of a choice's text says."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls)

    def extend(self, later: OutputDelta) -> None:
        """Append what `later` says (a piece of the same call continues that call's entry)."""
        self.content += later.content
        self.reasoning_content += later.reasoning_content
        for call in later.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index:
                last.id, last.name = last.id or call.id, last.name or call.name
                last.arguments += call.arguments
            else:
                self.tool_calls.append(ToolCallDelta(**vars(call)))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON, as the model wrote it


@dataclass
class ChoiceOutput:
    """A whole choice's output: its deltas joined."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: OutputDelta) -> None:
        self.content += delta.content
        self.reasoning_content += delta.reasoning_content
        for piece in delta.tool_calls:
            if piece.index == len(self.tool_calls):
                self.tool_calls.append(ToolCall(piece.id or "", piece.name or "", ""))
            call = self.tool_calls[piece.index]
            call.id, call.name = piece.id or call.id, piece.name or call.name
            call.arguments += piece.arguments


class OutputParser(ABC):
    """Sorts one choice's text into content, reasoning and tool calls; one per choice.

    The text comes in pieces split anywhere (inside a word, a tag, a JSON string): the parser
    must give the same joined result however it is split, holding back what it cannot place
    yet and giving it out at `finish`.
    """

    @abstractmethod
    def feed(self, text: str) -> OutputDelta:
        """What `text`, the choice's next piece, says (as far as can be told yet)."""

    def finish(self, finish_reason: str) -> tuple[OutputDelta, str]:
        """At the choice's end: what was held back, and its finish reason (a tool-call parser
        that produced calls answers "tool_calls" where the engine said "stop")."""
        return OutputDelta(), finish_reason


class PlainText(OutputParser):
    """Everything is content: the answer as the model wrote it."""

    def feed(self, text: str) -> OutputDelta:
        return OutputDelta(content=text)


class ReasoningThenAnswer(OutputParser):
    """A reasoning parser first, then the answer's parser on the answer part alone (tool
    calls are read only outside the thinking). `max_calls`: calls past that many are dropped
    (`parallel_tool_calls: false`)."""

    def __init__(
        self, reasoning: OutputParser | None, answer: OutputParser, max_calls: int | None = None
    ) -> None:
        self.reasoning = reasoning
        self.answer = answer
        self.max_calls = max_calls

    def feed(self, text: str) -> OutputDelta:
        if self.reasoning is None:
            return self._limited(self.answer.feed(text))
        split = self.reasoning.feed(text)
        out = OutputDelta(reasoning_content=split.reasoning_content)
        out.extend(self._limited(self.answer.feed(split.content)))
        return out

    def finish(self, finish_reason: str) -> tuple[OutputDelta, str]:
        out = OutputDelta()
        if self.reasoning is not None:
            rest, finish_reason = self.reasoning.finish(finish_reason)
            out.reasoning_content = rest.reasoning_content
            out.extend(self._limited(self.answer.feed(rest.content)))
        rest, finish_reason = self.answer.finish(finish_reason)
        out.extend(self._limited(rest))
        return out, finish_reason

    def _limited(self, delta: OutputDelta) -> OutputDelta:
        if self.max_calls is not None:
            delta.tool_calls = [c for c in delta.tool_calls if c.index < self.max_calls]
        return delta


def split_at(buf: str, tag: str) -> tuple[str, bool, str]:
    """(`buf` before `tag`, whether `tag` is there, the rest after it). When it is not there,
    the rest is the end of `buf` that may be the start of `tag`: a parser holds it back until
    more text tells (tags arrive split anywhere)."""
    at = buf.find(tag)
    if at >= 0:
        return buf[:at], True, buf[at + len(tag) :]
    keep = max((n for n in range(1, len(tag)) if buf.endswith(tag[:n])), default=0)
    return buf[: len(buf) - keep], False, buf[len(buf) - keep :]


class OutputPipeline:
    """One choice's path from the engine's tokens to its answer: text, then the parser."""

    def __init__(
        self, text: TextStream, parser: OutputParser, hide_stop_token: bool = False
    ) -> None:
        self.text = text
        self.parser = parser
        self.hide_stop_token = hide_stop_token  # see TextOptions.hide_stop_token

    def add(
        self, token_ids: list[int], finish_reason: str | None
    ) -> tuple[OutputDelta, str | None]:
        """What new tokens add to the answer, and the choice's finish reason once it ends:
        "stop" when a stop string matched (the caller then aborts the engine's request),
        else the engine's (None while it runs), as the parser may change it."""
        if finish_reason == "stop" and self.hide_stop_token:
            token_ids = token_ids[:-1]  # the engine stopped at this eos or stop token id
        text = self.text.add(token_ids)
        if self.text.stopped:
            finish_reason = "stop"
        elif finish_reason is not None:
            text += self.text.finish()
        delta = self.parser.feed(text)
        if finish_reason is not None:
            rest, finish_reason = self.parser.finish(finish_reason)
            delta.extend(rest)
        return delta, finish_reason
