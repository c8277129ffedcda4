"""What every tool-call parser shares: call ids, events into deltas, tags split anywhere.

A tool-call parser is an `OutputParser` (frontend/output.py) that finds the calls a model
family writes in its answer and turns them into `ToolCallDelta`s; text around the calls, and
call text it cannot read, stays content. Each family is one subclass in its own file,
registered by name in `tool_parsers/__init__.py` (the `--tool-call-parser` names, as vLLM's).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import ClassVar

from vlmserve.frontend.output import OutputDelta, OutputParser, ToolCallDelta
from vlmserve.frontend.tool_parsers.json_call import Args, Event, Raw, Start


def random_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser(OutputParser):
    """Finds a model family's tool calls in its answer.

    `keeps_special_tokens`: the family marks calls with special tokens (Mistral's
    `[TOOL_CALLS]`), so the answer must be detokenized with them (vLLM does the same).
    """

    keeps_special_tokens: ClassVar[bool] = False

    def __init__(self, new_id: Callable[[], str] = random_call_id) -> None:
        self.new_id = new_id
        self.calls = 0  # calls started so far

    def emit(self, events: list[Event], out: OutputDelta) -> None:
        """Add what the JSON reader found to `out`."""
        for event in events:
            if isinstance(event, Start):
                call = ToolCallDelta(self.calls, id=self.new_id(), name=event.name)
                out.extend(OutputDelta(tool_calls=[call]))
                self.calls += 1
            elif isinstance(event, Args):
                out.extend(
                    OutputDelta(tool_calls=[ToolCallDelta(self.calls - 1, arguments=event.text)])
                )
            elif isinstance(event, Raw):
                out.content += event.text

    def finish(self, finish_reason: str) -> tuple[OutputDelta, str]:
        rest = self.flush()
        # A model that wrote calls ended its turn to have them run (OpenAI's reason); one cut
        # by max_tokens says so instead.
        return rest, "tool_calls" if self.calls and finish_reason == "stop" else finish_reason

    def flush(self) -> OutputDelta:
        """What was held back, at the end of the text."""
        return OutputDelta()
