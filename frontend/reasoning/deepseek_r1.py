"""`deepseek_r1`: the answer's thinking, up to `</think>`, is reasoning; the rest is content.

DeepSeek-R1 (and Qwen3's thinking checkpoints, whose templates open `<think>` in the prompt)
write their thoughts first and close them with `</think>`; a leading `<think>` the model writes
itself is dropped. As vLLM's parser: an answer cut before `</think>` is all reasoning.
"""

from __future__ import annotations

from vlmserve.frontend.output import OutputDelta, OutputParser, split_at

START, END = "<think>", "</think>"


class DeepSeekR1(OutputParser):
    def __init__(self) -> None:
        self.mode = "start"  # start -> thinking -> answer
        self.held = ""

    def feed(self, text: str) -> OutputDelta:
        out, buf, self.held = OutputDelta(), self.held + text, ""
        if self.mode == "start":
            buf = self._start(buf, out)
        if self.mode == "thinking" and buf:
            before, found, rest = split_at(buf, END)
            out.reasoning_content += before
            if found:
                self.mode, buf = "answer", rest
            else:
                self.held, buf = rest, ""
        if self.mode == "answer":
            out.content += buf
        return out

    def _start(self, buf: str, out: OutputDelta) -> str:
        if buf.startswith(START):
            self.mode = "thinking"
            return buf[len(START) :]
        if START.startswith(buf):  # may still become the opening tag
            self.held = buf
            return ""
        self.mode = "thinking"
        return buf

    def finish(self, finish_reason: str) -> tuple[OutputDelta, str]:
        held, self.held = self.held, ""
        return OutputDelta(reasoning_content=held), finish_reason
