"""`mistral`: calls after the `[TOOL_CALLS]` token, as Mistral's models write them.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}        (tokenizers v11 and later)

`[TOOL_CALLS]` is a special token, so the answer is detokenized with special tokens kept.
Text before the calls is content; so is a block that is not calls, from the tag on. Call ids
are 9 letters and digits: Mistral's chat templates refuse any other id in the history.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable

from vlmserve.frontend.output import OutputDelta, split_at
from vlmserve.frontend.tool_parsers.base import ToolParser
from vlmserve.frontend.tool_parsers.call_list import CallList
from vlmserve.frontend.tool_parsers.json_call import CallReader, Raw, Start

TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ID_CHARS = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    return "".join(random.choices(_ID_CHARS, k=9))


class Mistral(ToolParser):
    keeps_special_tokens = True

    def __init__(self, new_id: Callable[[], str] = mistral_call_id) -> None:
        super().__init__(new_id)
        # content -> tag -> list | call | name -> args -> content
        self.mode = "content"
        self.held = ""
        self.name = ""  # v11: the name written before [ARGS]
        self.calls_list = CallList()
        self.reader = CallReader()

    def feed(self, text: str) -> OutputDelta:
        out, buf, self.held = OutputDelta(), self.held + text, ""
        while buf:
            buf = getattr(self, "_" + self.mode)(buf, out)
        return out

    def flush(self) -> OutputDelta:
        out, held, self.held = OutputDelta(), self.held, ""
        if self.mode == "content":
            out.content = held
        elif self.mode == "tag":
            out.content = TAG + held
        elif self.mode == "name":
            out.content = TAG + self.name + held
        else:
            events = self.calls_list.finish() if self.mode == "list" else self.reader.finish()
            self.emit(events, out)
        return out

    def _content(self, buf: str, out: OutputDelta) -> str:
        before, found, rest = split_at(buf, TAG)
        out.content += before
        if not found:
            self.held = rest
            return ""
        self.mode = "tag"
        return rest

    def _tag(self, buf: str, out: OutputDelta) -> str:
        stripped = buf.lstrip()
        if not stripped:
            self.held = buf
        elif stripped[0] == "[":
            self.mode, self.calls_list = "list", CallList()
            return stripped
        elif stripped[0] == "{":
            self.mode, self.reader = "call", CallReader()
            return stripped
        else:
            self.mode, self.name = "name", ""
            return buf
        return ""

    def _list(self, buf: str, out: OutputDelta) -> str:
        events, rest = self.calls_list.feed(buf)
        self.emit(events, out)
        if self.calls_list.done or self.calls_list.broken:
            self.mode = "content"
        return rest

    def _call(self, buf: str, out: OutputDelta) -> str:
        events, rest = self.reader.feed(buf)
        self.emit(events, out)
        if self.reader.done:
            self.mode = "content"
        return rest

    def _name(self, buf: str, out: OutputDelta) -> str:
        before, found, rest = split_at(buf, ARGS)
        self.name += before
        if not found:
            self.held = rest
            return ""
        if NAME.fullmatch(self.name.strip()):
            self.emit([Start(self.name.strip())], out)
            self.mode, self.reader = "args", CallReader.arguments()
        else:
            self.emit([Raw(TAG + self.name + ARGS)], out)
            self.mode = "content"
        return rest

    def _args(self, buf: str, out: OutputDelta) -> str:
        stripped = buf.lstrip()
        if stripped:
            self.mode = "call"  # the arguments reader takes it from the `{`
        return stripped
