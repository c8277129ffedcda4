"""`llama3_json`: Llama 3.1 / 3.2 JSON calls, the whole answer being calls.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

As vLLM reads them: an answer that starts (after whitespace) with `<|python_tag|>` or `{` is
calls, separated by `;`; any other answer is content. A first object that is not a call, and
anything after the calls that is not another one, stays content.
"""

from __future__ import annotations

import string
from collections.abc import Callable

from vlmserve.frontend.output import OutputDelta
from vlmserve.frontend.tool_parsers.base import ToolParser, random_call_id
from vlmserve.frontend.tool_parsers.json_call import CallReader, Raw

PYTHON_TAG = "<|python_tag|>"
SEPARATORS = string.whitespace + ";"


class Llama3Json(ToolParser):
    def __init__(self, new_id: Callable[[], str] = random_call_id) -> None:
        super().__init__(new_id)
        self.mode = "start"  # start -> between <-> call; any -> content (for good)
        self.held = ""
        self.reader = CallReader()

    def feed(self, text: str) -> OutputDelta:
        out, buf, self.held = OutputDelta(), self.held + text, ""
        while buf:
            buf = getattr(self, "_" + self.mode)(buf, out)
        return out

    def flush(self) -> OutputDelta:
        out, held, self.held = OutputDelta(), self.held, ""
        if self.mode == "start":
            out.content = held
        elif self.mode == "call":
            for event in self.reader.finish():
                out.content += event.text
        return out

    def _start(self, buf: str, out: OutputDelta) -> str:
        stripped = buf.lstrip()
        if stripped.startswith(PYTHON_TAG):
            self.mode = "between"
            return stripped[len(PYTHON_TAG) :]
        if stripped.startswith("{"):
            self.mode = "between"
            return stripped
        if not stripped or PYTHON_TAG.startswith(stripped):
            self.held = buf
            return ""
        self.mode = "content"
        return buf

    def _between(self, buf: str, out: OutputDelta) -> str:
        """Between calls: separators and whitespace are dropped."""
        stripped = buf.lstrip(SEPARATORS)
        if stripped.startswith("{"):
            self.mode, self.reader = "call", CallReader()
        elif stripped:
            self.mode = "content"
        return stripped

    def _call(self, buf: str, out: OutputDelta) -> str:
        events, rest = self.reader.feed(buf)
        if any(isinstance(e, Raw) for e in events):
            self.mode = "content"
        self.emit(events, out)
        if self.reader.done and self.mode == "call":
            self.mode = "between"
        return rest

    def _content(self, buf: str, out: OutputDelta) -> str:
        out.content += buf
        return ""
