"""Per-layer additions to the decoder's residual stream at some token rows: DeepStack.

Qwen3-VL's vision tower gives, besides the embeddings that replace the image placeholders,
one more feature row per placeholder for each of its `deepstack_visual_indexes`; level i is
added to the hidden states that decoder layer i outputs, at the placeholder rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerAdditions:
    rows: torch.Tensor  # [n] rows of the step's tokens
    levels: list[torch.Tensor]  # per layer, from the first: [n, hidden]

    def add(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden], the output of decoder layer `layer` (< len(levels))."""
        return x.index_add(0, self.rows, self.levels[layer].to(x.dtype))
