"""The output pipeline (frontend/output.py) with a parser of the kind to come: reasoning in
`<think>` tags and tool calls in `<call>` tags. However the text is split, streamed deltas join
to the non-streamed answer, and the chat route writes both in OpenAI's shapes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import openai.types.chat as oai

from vlmserve.frontend.generation import (
    EnginePrompt,
    TextOptions,
    collect_choices,
    generate_choices,
)
from vlmserve.frontend.output import (
    ChoiceOutput,
    OutputDelta,
    OutputParser,
    PlainText,
    ToolCall,
    ToolCallDelta,
)
from vlmserve.frontend.routes.chat import assistant_message, chat_delta
from vlmserve.frontend.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    make_usage,
)
from vlmserve.shared.messages import RequestOutput, SamplingParams

TEXT = (
    'Hi <think>hmm, <b></think>ok <call>get_weather {"city": "Paris"}</call> done <call>f {}</call>'
)
WHOLE = ChoiceOutput(
    content="Hi ok  done ",
    reasoning_content="hmm, <b>",
    tool_calls=[
        ToolCall("call_0", "get_weather", '{"city": "Paris"}'),
        ToolCall("call_1", "f", "{}"),
    ],
)
# The tags that end each mode, and the mode each one leads to.
ENDS = {"content": ("<think>", "<call>"), "think": ("</think>",), "args": ("</call>",)}
AFTER = {"<think>": "think", "<call>": "name", "</think>": "content", "</call>": "content"}


class ThinkAndCalls(OutputParser):
    """A toy reasoning + tool-call parser: holds back any tail that may begin a tag."""

    def __init__(self) -> None:
        self.mode, self.held, self.calls = "content", "", 0

    def feed(self, text: str) -> OutputDelta:
        out, buf, self.held = OutputDelta(), self.held + text, ""
        while buf:
            if self.mode == "name":
                name, space, rest = buf.partition(" ")
                if not space:
                    self.held = buf
                    break
                out.extend(
                    OutputDelta(tool_calls=[ToolCallDelta(self.calls, f"call_{self.calls}", name)])
                )
                self.mode, buf = "args", rest
                continue
            hits = [(buf.find(tag), tag) for tag in ENDS[self.mode] if tag in buf]
            if hits:
                at, tag = min(hits)
                self._emit(out, buf[:at])
                buf, self.mode = buf[at + len(tag) :], AFTER[tag]
                self.calls += tag == "</call>"
                continue
            keep = max(
                (n for tag in ENDS[self.mode] for n in range(1, len(tag)) if buf.endswith(tag[:n])),
                default=0,
            )
            self._emit(out, buf[: len(buf) - keep])
            self.held = buf[len(buf) - keep :]
            break
        return out

    def _emit(self, out: OutputDelta, text: str) -> None:
        if text and self.mode == "content":
            out.extend(OutputDelta(content=text))
        elif text and self.mode == "think":
            out.extend(OutputDelta(reasoning_content=text))
        elif text:
            out.extend(OutputDelta(tool_calls=[ToolCallDelta(self.calls, arguments=text)]))

    def finish(self, finish_reason: str) -> tuple[OutputDelta, str]:
        out, held, self.held = OutputDelta(), self.held, ""
        self._emit(out, held)
        return out, "tool_calls" if self.calls and finish_reason == "stop" else finish_reason


def joined(pieces: list[str]) -> tuple[ChoiceOutput, str]:
    parser, whole = ThinkAndCalls(), ChoiceOutput()
    for piece in pieces:
        whole.add(parser.feed(piece))
    rest, finish = parser.finish("stop")
    whole.add(rest)
    return whole, finish


def test_the_toy_parser_reads_the_whole_text() -> None:
    assert joined([TEXT]) == (WHOLE, "tool_calls")
    assert joined(["plain text only"]) == (ChoiceOutput(content="plain text only"), "stop")


def test_deltas_join_to_the_whole_answer_however_the_text_is_split() -> None:
    for at in range(len(TEXT) + 1):
        assert joined([TEXT[:at], TEXT[at:]]) == (WHOLE, "tool_calls"), at
    assert joined(list(TEXT)) == (WHOLE, "tool_calls")


def test_pieces_of_one_call_merge_into_one_delta() -> None:
    delta = OutputDelta(tool_calls=[ToolCallDelta(0, "call_0", "f", "{")])
    delta.extend(OutputDelta(content="x", tool_calls=[ToolCallDelta(0, arguments="}")]))
    delta.extend(OutputDelta(tool_calls=[ToolCallDelta(1, "call_1", "g")]))
    assert delta == OutputDelta(
        content="x",
        tool_calls=[ToolCallDelta(0, "call_0", "f", "{}"), ToolCallDelta(1, "call_1", "g")],
    )
    assert not OutputDelta() and OutputDelta(reasoning_content="r")


# ---- through generate_choices: the detokenizer, stop strings, then the parser ------------------


class CharTokenizer:
    """One token per character: token id = code point."""

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        return "".join(map(chr, token_ids))

    def convert_ids_to_tokens(self, ids: int) -> str:
        return chr(ids)


class FakeScheduler:
    """Answers every request with the given token batches, the last one finishing it."""

    alive = True
    frontend_id = "fe-test"

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    async def generate(self, request_id: str, *args: object) -> AsyncIterator[RequestOutput]:
        for i, batch in enumerate(self.batches):
            last = i == len(self.batches) - 1
            yield RequestOutput(request_id, batch, finish_reason="stop" if last else None)


def run_choice(batches: list[list[int]], stop: list[str], parser: type[OutputParser]):  # noqa: ANN201
    async def run():  # noqa: ANN202
        deltas = generate_choices(
            FakeScheduler(batches), CharTokenizer(), [EnginePrompt([ord("p")])],
            SamplingParams(), 1, TextOptions(stop=stop), parser,
        )  # fmt: skip
        streamed = [d async for d in deltas]
        return streamed, await collect_choices(aiter_of(streamed), 1)

    return asyncio.run(run())


async def aiter_of(items: list) -> AsyncIterator:
    for item in items:
        yield item


def test_the_pipeline_gives_the_same_answer_for_every_split_of_the_tokens() -> None:
    ids = [ord(c) for c in TEXT]
    for at in range(len(ids) + 1):
        streamed, ([choice], _) = run_choice([ids[:at], ids[at:]], [], ThinkAndCalls)
        assert (choice.output, choice.finish_reason) == (WHOLE, "tool_calls"), at
        assert [d.finish_reason for d in streamed][-1] == "tool_calls"
        assert choice.token_ids == ids


def test_stop_strings_cut_the_text_before_the_parser_sees_it() -> None:
    ids = [ord(c) for c in TEXT]
    _, ([choice], _) = run_choice(
        [ids[i : i + 3] for i in range(0, len(ids), 3)], ["done"], ThinkAndCalls
    )
    assert choice.output == ChoiceOutput(
        content="Hi ok  ", reasoning_content="hmm, <b>", tool_calls=WHOLE.tool_calls[:1]
    )
    _, ([plain], _) = run_choice([ids], ["<call>"], PlainText)
    assert (plain.output, plain.finish_reason) == (
        ChoiceOutput(content=TEXT[: TEXT.index("<call>")]),
        "stop",
    )


# ---- what the chat route makes of it, read back with the openai package's types -------------


def test_chat_shapes_of_reasoning_and_tool_calls_as_openai_reads_them() -> None:
    ids = [ord(c) for c in TEXT]
    streamed, ([choice], _) = run_choice([[t] for t in ids], [], ThinkAndCalls)
    content, reasoning, calls, finish = "", "", {}, None
    for d in streamed:
        delta = ChatChunkChoice(index=0, delta=chat_delta(d.output), finish_reason=d.finish_reason)
        chunk = ChatCompletionChunk(id="c", created=0, model="m", choices=[delta])
        [c] = oai.ChatCompletionChunk.model_validate_json(msgspec.json.encode(chunk)).choices
        content += c.delta.content or ""
        reasoning += getattr(c.delta, "reasoning_content", None) or ""
        for call in c.delta.tool_calls or []:
            entry = calls.setdefault(
                call.index, {"id": call.id, "name": call.function.name, "args": ""}
            )
            entry["args"] += call.function.arguments or ""
        finish = c.finish_reason or finish
    whole = ChatChoice(
        index=0, message=assistant_message(choice.output), finish_reason="tool_calls"
    )
    answer = ChatCompletion(
        id="c", created=0, model="m", choices=[whole], usage=make_usage(1, len(ids))
    )
    message = oai.ChatCompletion.model_validate_json(msgspec.json.encode(answer)).choices[0].message
    assert (message.content, content) == (WHOLE.content, WHOLE.content)
    assert message.reasoning_content == reasoning == WHOLE.reasoning_content
    whole_calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
    assert whole_calls == [(c["id"], c["name"], c["args"]) for c in calls.values()]
    assert whole_calls == [(c.id, c.name, c.arguments) for c in WHOLE.tool_calls]
    assert finish == "tool_calls"


def test_a_plain_answer_is_written_as_before() -> None:
    plain = assistant_message(ChoiceOutput(content="hello"))
    assert msgspec.json.encode(plain) == b'{"role":"assistant","content":"hello"}'
    assert msgspec.json.encode(chat_delta(OutputDelta(content="hel"))) == b'{"content":"hel"}'
    assert msgspec.json.encode(chat_delta(OutputDelta())) == b"{}"
