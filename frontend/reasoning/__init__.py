"""Reasoning parsers by `--reasoning-parser` name (vLLM's names): each splits an answer's
thinking (`reasoning_content`) from the answer itself, before any tool-call parser reads it."""

from __future__ import annotations

from vlmserve.frontend.output import OutputParser
from vlmserve.frontend.reasoning.deepseek_r1 import DeepSeekR1
from vlmserve.frontend.reasoning.qwen3 import Qwen3

__all__ = ["REASONING_PARSERS", "DeepSeekR1", "Qwen3"]

REASONING_PARSERS: dict[str, type[OutputParser]] = {"deepseek_r1": DeepSeekR1, "qwen3": Qwen3}
