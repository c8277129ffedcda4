"""Reading tool calls written as JSON while their text streams in.

Models write a call as `{"name": "f", "arguments": {...}}` (Llama 3 says "parameters"), one
alone, or several in a JSON array. `CallReader` reads one such object from its `{`: once the
name and the opening of the arguments are in, it names the call and streams the arguments
object's text as it comes, as OpenAI streams calls. An object that does not start that way is
held until it closes, then read whole; one that is not a call at all is given back as raw
text (the caller keeps it as content). Every decision depends only on the text so far, never
on where it was split, so streamed pieces join to what the whole text gives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# The call's opening, up to (not including) the `{` of its arguments. The lookahead needs
# that `{` to be there, so a match never depends on whitespace still to come.
HEADER = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'
)


@dataclass
class Start:
    """A new call named `name` begins."""

    name: str


@dataclass
class Args:
    """More of the current call's arguments (JSON text)."""

    text: str


@dataclass
class Raw:
    """Text that turned out not to be a call: content."""

    text: str


Event = Start | Args | Raw


class JsonDepth:
    """The nesting depth of a JSON text read one character at a time (brackets inside
    strings do not count)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def step(self, ch: str) -> int:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        return self.depth


class CallReader:
    """One call object, fed from its opening `{`; `done` once the object has closed."""

    def __init__(self) -> None:
        self.state = "head"  # head -> args -> tail -> done
        self.bare = False  # arguments alone, no call object around them (see `arguments`)
        self.buf = ""  # head: the object's text so far
        self.head = JsonDepth()  # head: depth of the whole object
        self.args = JsonDepth()  # args: depth of the arguments object
        self.outer = JsonDepth()  # tail: depth of the call object around the arguments

    @classmethod
    def arguments(cls) -> CallReader:
        """A reader of an arguments object alone, fed from its `{` (the call was named
        another way, as Mistral's `name[ARGS]{...}`)."""
        reader = cls()
        reader.state, reader.bare = "args", True
        return reader

    @property
    def done(self) -> bool:
        return self.state == "done"

    def feed(self, text: str) -> tuple[list[Event], str]:
        """Events for `text` and the text after the object once it has closed ("" before)."""
        events: list[Event] = []
        for i, ch in enumerate(text):
            if self.state == "head":
                self.buf += ch
                if self.head.step(ch) == 0:  # closed before its header was seen
                    events += self._whole()
                    return events, text[i + 1 :]
            elif self.state == "args":
                events.append(Args(ch))
                if self.args.step(ch) == 0 and self.bare:
                    self.state = "done"
                    return _joined(events), text[i + 1 :]
                if self.args.depth == 0:
                    self.state = "tail"
            elif self.outer.step(ch) == 0:  # tail: what follows the arguments is dropped
                self.state = "done"
                return _joined(events), text[i + 1 :]
        if self.state == "head":
            events += self._try_header()
        return _joined(events), ""

    def finish(self) -> list[Event]:
        """At the end of the text: an object still in its head is content."""
        if self.state == "head" and self.buf:
            return [Raw(self.buf)]
        return []

    def _try_header(self) -> list[Event]:
        match = HEADER.match(self.buf)
        name = _json_string(match.group(1)) if match else None
        if name is None:
            return []
        rest, self.buf = self.buf[match.end() :], ""
        self.state, self.outer.depth = "args", 1
        events, _ = self.feed(rest)  # `rest` ends at the object's end or before it
        return [Start(name), *events]

    def _whole(self) -> list[Event]:
        """The object closed in its head: a call whose header has another form (keys in
        another order, string arguments), or no call at all."""
        events = self._try_header()
        if events:
            return events
        text, self.buf, self.state = self.buf, "", "done"
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return [Raw(text)]
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return [Raw(text)]
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        elif not isinstance(args, str):
            return [Raw(text)]
        return [Start(value["name"]), Args(args)]


def _json_string(body: str) -> str | None:
    try:
        return json.loads(f'"{body}"')
    except json.JSONDecodeError:
        return None


def _joined(events: list[Event]) -> list[Event]:
    """Adjacent argument pieces as one."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, Args) and out and isinstance(out[-1], Args):
            out[-1] = Args(out[-1].text + event.text)
        else:
            out.append(event)
    return out
