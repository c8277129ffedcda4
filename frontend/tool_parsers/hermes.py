"""`hermes`: calls in `<tool_call>` tags, as Hermes 2 Pro, Qwen2.5 and Qwen3 write them.

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {}}
    </tool_call>

Text before, between and after the blocks is content, except whitespace that only leads to a
block or to the end (the line breaks between blocks, after the last, after `</think>`). A
block whose inside is not a call stays content, tags and all.
"""

from __future__ import annotations

from collections.abc import Callable

from vlmserve.frontend.output import OutputDelta, split_at
from vlmserve.frontend.tool_parsers.base import ToolParser, random_call_id
from vlmserve.frontend.tool_parsers.json_call import CallReader, Raw

START, END = "<tool_call>", "</tool_call>"


class Hermes(ToolParser):
    def __init__(self, new_id: Callable[[], str] = random_call_id) -> None:
        super().__init__(new_id)
        # content -> open (after <tool_call>) -> call -> close (until </tool_call>) -> content;
        # a block that is no call goes open/call -> raw (content until </tool_call>).
        self.mode = "content"
        self.held = ""  # text that may begin a tag
        self.opening = ""  # the open block's text before its call object
        self.reader = CallReader()
        # At the answer's start and after a call, whitespace waits: it is dropped unless
        # content follows (a call, or the end, may).
        self.after_call = True
        self.spaces = ""

    def feed(self, text: str) -> OutputDelta:
        out, buf, self.held = OutputDelta(), self.held + text, ""
        while buf:
            buf = getattr(self, "_" + self.mode)(buf, out)
        return out

    def flush(self) -> OutputDelta:
        out, held, self.held = OutputDelta(), self.held, ""
        if self.mode in ("content", "raw"):
            self._say(held, False, out)
        elif self.mode == "open":
            self._say(self.opening, False, out)
        elif self.mode == "call":
            for event in self.reader.finish():  # an object still in its head: content
                self._say(self.opening + event.text, False, out)
        return out

    def _say(self, text: str, call_follows: bool, out: OutputDelta) -> None:
        """Content; whitespace after a call waits to see whether content or a call follows."""
        if self.after_call:
            text = self.spaces + text
            if not text.strip():
                self.spaces = "" if call_follows else text
                return
            self.after_call, self.spaces = False, ""
        out.content += text

    def _content(self, buf: str, out: OutputDelta) -> str:
        before, found, rest = split_at(buf, START)
        self._say(before, found, out)
        if not found:
            self.held = rest
            return ""
        self.mode, self.opening = "open", START
        return rest

    def _open(self, buf: str, out: OutputDelta) -> str:
        stripped = buf.lstrip()
        self.opening += buf[: len(buf) - len(stripped)]
        if stripped.startswith("{"):
            self.mode, self.reader = "call", CallReader()
        elif stripped:
            self._say(self.opening, False, out)
            self.mode = "raw"
        return stripped

    def _call(self, buf: str, out: OutputDelta) -> str:
        # The object is read only up to the closing tag: a block that closes inside it ends
        # there (content if the call had not begun, else the call as far as it was written).
        before, found, rest = split_at(buf, END)
        events, after = self.reader.feed(before)
        if not found and not self.reader.done:
            self.held, rest = rest, ""  # may begin the closing tag
        tail = after + (END if found else "") + rest
        raw = [e for e in events if isinstance(e, Raw)]
        if found and not self.reader.done:
            raw = self.reader.finish()  # still in its head: not a call
        if raw:
            self._say(self.opening + raw[0].text, False, out)
            self.mode = "raw"
            return tail
        self.emit(events, out)
        if self.reader.done or found:
            self.mode, self.after_call, self.spaces = "close", True, ""
        return tail

    def _close(self, buf: str, out: OutputDelta) -> str:
        stripped = buf.lstrip()
        if stripped.startswith(END):
            self.mode = "content"
            return stripped[len(END) :]
        if END.startswith(stripped):  # whitespace, or the start of the closing tag
            self.held = buf
            return ""
        self.mode = "content"  # no closing tag: what follows is content
        return buf

    def _raw(self, buf: str, out: OutputDelta) -> str:
        before, found, rest = split_at(buf, END)
        out.content += before + (END if found else "")
        if not found:
            self.held = rest
            return ""
        self.mode = "content"
        return rest
