"""Calls the request forces (`tool_choice` "required" or a named function), whatever the model.

The frontend then constrains the answer with a JSON-schema grammar (frontend/tool_choice.py),
as vLLM does, and reads the calls straight from that JSON, so no model family's own format
is involved:

- a named function: the answer is that function's arguments object;
- "required": the answer is an array of `{"name": ..., "parameters": {...}}`, at least one.
"""

from __future__ import annotations

from collections.abc import Callable

from vlmserve.frontend.output import OutputDelta
from vlmserve.frontend.tool_parsers.base import ToolParser, random_call_id
from vlmserve.frontend.tool_parsers.call_list import CallList
from vlmserve.frontend.tool_parsers.json_call import Args, Start


class NamedCall(ToolParser):
    """The whole answer is the arguments of one call to `name`."""

    def __init__(self, name: str, new_id: Callable[[], str] = random_call_id) -> None:
        super().__init__(new_id)
        self.name = name

    def feed(self, text: str) -> OutputDelta:
        out = OutputDelta()
        if not self.calls:
            text = text.lstrip()  # the call begins with its arguments' first character
            if not text:
                return out
            self.emit([Start(self.name)], out)
        self.emit([Args(text)], out)
        return out


class RequiredCalls(ToolParser):
    """The answer is a JSON array of calls. An answer that is not (a model left
    unconstrained) is content: all of it when no call was read, else from where it stopped
    being one. Whitespace after the array is dropped."""

    def __init__(self, new_id: Callable[[], str] = random_call_id) -> None:
        super().__init__(new_id)
        self.calls_list = CallList()
        self.content = False  # past the array: the rest is content
        self.unread = ""  # the answer so far, until a call begins
        self.after = ""  # whitespace after the array, held

    def feed(self, text: str) -> OutputDelta:
        out = OutputDelta()
        listing = self.calls_list
        if not (self.content or listing.done or listing.broken):
            self.unread += text
            events, text = listing.feed(text)
            started = self.calls or any(isinstance(e, Start) for e in events)
            if listing.broken and not started:
                text, events = self.unread, []
            self.emit(events, out)
            self.content = listing.broken
        if self.content:
            out.content += text
            return out
        self.after += text
        if self.after.strip():
            out.content, self.after, self.content = self.after, "", True
        return out

    def flush(self) -> OutputDelta:
        if not self.calls and not self.content:
            return OutputDelta(content=self.unread)
        out = OutputDelta()
        self.emit(self.calls_list.finish(), out)
        return out
