"""A JSON array of call objects, read as it streams in: Mistral's `[TOOL_CALLS][...]` and the
array that `tool_choice: "required"` makes the model write."""

from __future__ import annotations

from vlmserve.frontend.tool_parsers.json_call import CallReader, Event, Raw


class CallList:
    """Fed from the array's `[`. `done` after its `]`; `broken` when something in it is not a
    call (the text from there on is the caller's content, starting with the returned rest)."""

    def __init__(self) -> None:
        self.mode = "open"  # open -> item -> call -> next -> item ... -> done | broken
        self.reader = CallReader()

    @property
    def done(self) -> bool:
        return self.mode == "done"

    @property
    def broken(self) -> bool:
        return self.mode == "broken"

    def feed(self, text: str) -> tuple[list[Event], str]:
        """Events for `text`, and the text after the array (or from where it broke)."""
        events: list[Event] = []
        buf = text
        while buf and self.mode not in ("done", "broken"):
            if self.mode == "call":
                found, buf = self.reader.feed(buf)
                if any(isinstance(e, Raw) for e in found):
                    self.mode = "broken"
                elif self.reader.done:
                    self.mode = "next"
                events += found
                continue
            buf = buf.lstrip()
            if not buf:
                break
            expected = {"open": "[", "item": "{]", "next": ",]"}[self.mode]
            if buf[0] not in expected:
                self.mode = "broken"
            elif buf[0] == "{":
                self.mode, self.reader = "call", CallReader()
            else:
                self.mode = {"[": "item", ",": "item", "]": "done"}[buf[0]]
                buf = buf[1:]
        return events, buf

    def finish(self) -> list[Event]:
        return self.reader.finish() if self.mode == "call" else []
