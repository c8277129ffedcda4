"""Prompt logprobs (vLLM's `prompt_logprobs`): how likely each prompt token was, given the
tokens before it, from the logits at every prompt position of the sequences that ask.

Other sequences keep computing logits at their last position only. A sequence's positions
may come over several steps (chunked prefill): position p predicts prompt token p + 1, so the
last position of one chunk scores the first token of the next, and the prompt's last position
is the one the first output token is sampled from (no prompt token to score). The scheduler
gives such a sequence no cached prefix (a cached block has no logits), as vLLM does. Rank 0
collects the results and sends them once, when the sequence samples its first token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmserve.shared.messages import PromptLogprobs

# Prompt positions scored per pass: bounds the [rows, vocab] float32 logits held at once.
ROWS_PER_PASS = 512


def scored_positions(start: int, num_tokens: int, prompt_len: int) -> range:
    """The positions of a step's tokens `[start, start + num_tokens)` that score a prompt
    token: those before the prompt's last position."""
    return range(start, min(start + num_tokens, prompt_len - 1))


@dataclass
class PromptLogprobsBuffer:
    """One sequence's prompt logprobs so far (rank 0); entry i is about prompt token i + 1."""

    num_top: int
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def add(self, first_position: int, scores: PromptLogprobs) -> None:
        """Append the scores of positions from `first_position` on, which must come next."""
        assert first_position == len(self.logprobs), (
            f"prompt logprobs of position {first_position} after {len(self.logprobs)} positions"
        )
        self.logprobs += scores.logprobs
        self.ranks += scores.ranks
        self.top_ids += [ids[: self.num_top] for ids in scores.top_ids]
        self.top_logprobs += [values[: self.num_top] for values in scores.top_logprobs]

    def result(self) -> PromptLogprobs:
        return PromptLogprobs(self.logprobs, self.ranks, self.top_ids, self.top_logprobs)


def score_prompt_tokens(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    num_top: int,
    keep: bool = True,
) -> PromptLogprobs | None:
    """Score `targets` ([rows] int64, the token after each row's position) under the logits of
    `hidden` ([rows, hidden]), with the top `num_top` candidates of each row.

    Every tensor-parallel rank must call this alike (the logits are gathered to rank 0); ranks that
    do not sample pass `keep=False` and get None. Logprobs are the raw logits' log_softmax, as
    the sampler reports them. A target past the logits' width scores -inf, ranked last.
    """
    kept: list[PromptLogprobs] = []
    for rows, row_targets in zip(
        hidden.split(ROWS_PER_PASS), targets.split(ROWS_PER_PASS), strict=True
    ):
        logits = compute_logits(rows).float()  # [rows, vocab]
        if keep:
            kept.append(_score(torch.log_softmax(logits, dim=-1), row_targets, num_top))
    if not keep:
        return None
    return PromptLogprobs(
        logprobs=[v for part in kept for v in part.logprobs],
        ranks=[r for part in kept for r in part.ranks],
        top_ids=[ids for part in kept for ids in part.top_ids],
        top_logprobs=[values for part in kept for values in part.top_logprobs],
    )


def split_scores(scores: PromptLogprobs, counts: list[int]) -> list[PromptLogprobs]:
    """`scores` cut into consecutive parts of `counts` rows (one per sequence)."""
    parts, start = [], 0
    for count in counts:
        end = start + count
        parts.append(
            PromptLogprobs(
                scores.logprobs[start:end],
                scores.ranks[start:end],
                scores.top_ids[start:end],
                scores.top_logprobs[start:end],
            )
        )
        start = end
    return parts


def _score(logprobs: torch.Tensor, targets: torch.Tensor, num_top: int) -> PromptLogprobs:
    vocab = logprobs.shape[-1]
    inside = targets < vocab
    chosen = logprobs.gather(1, targets.clamp(max=vocab - 1).unsqueeze(1))  # [rows, 1]
    chosen = chosen.masked_fill(~inside.unsqueeze(1), float("-inf"))
    # vLLM's rank: how many tokens score at least as well (the token itself included).
    ranks = (logprobs >= chosen).sum(dim=-1).masked_fill(~inside, vocab + 1)
    top_values, top_ids = logprobs.topk(min(num_top, vocab), dim=-1)  # [rows, num_top]
    return PromptLogprobs(
        logprobs=chosen.squeeze(1).tolist(),
        ranks=ranks.tolist(),
        top_ids=top_ids.tolist(),
        top_logprobs=top_values.tolist(),
    )
