"""What the repetition, presence and frequency penalties read: each penalised row's tokens.

Two forms feed the sampler alike: sparse (row, token id) lists built from token id lists (the
reference, and what tests give), or each sequence's counts over the whole vocabulary kept on
the device by the workers (PenaltyCounts), updated from new tokens only, so a step costs the
same however long the sequences are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmserve.shared.messages import SamplingParams


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


class PenaltyCounts:
    """One penalised sequence's token counts on the device, caught up from its new tokens.

    `seen` marks the prompt's and the generated tokens (repetition_penalty), `output` counts
    the generated ones (presence and frequency penalties); ids at or past `vocab` are ignored.
    A sequence resumed after preemption gets new counts, which catch up from all its tokens.
    """

    def __init__(self, vocab: int, device: torch.device | str) -> None:
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # [vocab]
        self.output = torch.zeros(vocab, dtype=torch.float32, device=device)  # [vocab]
        self.num_counted = 0  # tokens of the sequence counted so far

    def update(self, token_ids: list[int], prompt_len: int) -> None:
        """Count the tokens of `token_ids` (the sequence's prompt, then its output) not yet
        counted: O(new tokens), one small copy to the device."""
        counted, vocab = self.num_counted, self.seen.shape[0]
        if counted == len(token_ids):
            return
        new = [t for t in token_ids[counted:] if t < vocab]
        outputs = [t for t in token_ids[max(counted, prompt_len) :] if t < vocab]
        self.num_counted = len(token_ids)
        if new:
            ids = torch.tensor(new + outputs, dtype=torch.long).to(self.seen.device)
            self.seen[ids[: len(new)]] = True
            if outputs:
                out = ids[len(new) :]
                self.output.index_put_((out,), torch.ones_like(out, dtype=torch.float32), True)


Counts = tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None


def sparse_counts(
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    device: torch.device | str,
) -> tuple[Counts, Counts]:
    """(rows, ids) of the tokens each penalty reads, or None where no row has any."""
    seen_rows: list[int] = []
    seen_ids: list[int] = []
    out_rows: list[int] = []
    out_ids: list[int] = []
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            ids = prompt_ids[i] + output_ids[i]
            seen_rows += [i] * len(ids)
            seen_ids += ids
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            out_rows += [i] * len(output_ids[i])
            out_ids += output_ids[i]

    def sparse(rows: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not ids:
            return None
        return (
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(ids, dtype=torch.long, device=device),
        )

    return sparse(seen_rows, seen_ids), sparse(out_rows, out_ids)


def dense_counts(
    params: list[SamplingParams],
    counts: Sequence[PenaltyCounts | None],
    device: torch.device | str,
) -> tuple[Counts, Counts]:
    """[num_seqs, vocab] stacks of the rows' PenaltyCounts (zeros for rows without that
    penalty), or None where no row has it."""
    reps = [c if c is not None and p.repetition_penalty != 1.0 else None
            for p, c in zip(params, counts, strict=True)]  # fmt: skip
    occ = [c if c is not None and (p.presence_penalty or p.frequency_penalty) else None
           for p, c in zip(params, counts, strict=True)]  # fmt: skip
    some = next((c for c in counts if c is not None), None)
    if some is None:
        return None, None
    no_seen, no_output = torch.zeros_like(some.seen), torch.zeros_like(some.output)
    seen = torch.stack([c.seen if c else no_seen for c in reps]) if any(reps) else None
    output = torch.stack([c.output if c else no_output for c in occ]) if any(occ) else None
    return seen, output
