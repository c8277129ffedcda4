"""`qwen3`: `<think>`...`</think>` at the start of the answer is reasoning; the rest is content.

Unlike `deepseek_r1`, an answer that does not open with `<think>` (Qwen3 asked not to think,
or a model that never thinks) is all content. An answer cut inside its thinking is reasoning.
"""

from __future__ import annotations

from vlmserve.frontend.output import OutputDelta
from vlmserve.frontend.reasoning.deepseek_r1 import START, DeepSeekR1


class Qwen3(DeepSeekR1):
    def _start(self, buf: str, out: OutputDelta) -> str:
        if buf.startswith(START):
            self.mode = "thinking"
            return buf[len(START) :]
        if START.startswith(buf):
            self.held = buf
            return ""
        self.mode = "answer"
        return buf

    def finish(self, finish_reason: str) -> tuple[OutputDelta, str]:
        if self.mode == "start":  # a prefix of "<think>" and nothing more: content
            held, self.held = self.held, ""
            return OutputDelta(content=held), finish_reason
        return super().finish(finish_reason)
