"""Tool-call parsers by `--tool-call-parser` name (vLLM's names), one model family per file."""

from __future__ import annotations

from vlmserve.frontend.tool_parsers.base import ToolParser
from vlmserve.frontend.tool_parsers.hermes import Hermes
from vlmserve.frontend.tool_parsers.llama3_json import Llama3Json
from vlmserve.frontend.tool_parsers.mistral import Mistral

__all__ = ["TOOL_PARSERS", "Hermes", "Llama3Json", "Mistral", "ToolParser"]

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": Hermes,
    "llama3_json": Llama3Json,
    "mistral": Mistral,
}
