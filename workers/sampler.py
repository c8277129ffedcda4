"""Turn one step's logits into next tokens (and logprobs), vectorised over the batch.

The order follows vLLM v1: logprobs from the raw logits; then logit_bias, the repetition,
presence and frequency penalties and the min_tokens mask; then the sequences' own logits
processors (workers/logits_processors.py: bans, grammar masks); then either the argmax (greedy
rows) or temperature, top-k, top-p and min-p (HF's warper order) and a seeded draw.

The draw is an exponential race, `argmax(probs / q)` with `q ~ Exp(1)` per token, which picks
token i with probability probs[i]. Each sampled row fills its own `q` from a generator seeded by
`draw_seed(seed, count)`, so a seeded request gets the same tokens whatever else is in the batch,
in whatever order, and after it is recomputed following preemption.

The workers keep what the penalties read (each penalised sequence's token counts) on the device
and update it from the new tokens only (PenaltyCounts), and send a batch whose rows are all
plain greedy straight to the argmax (`is_plain_greedy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmserve.shared.messages import SamplingParams, TokenLogprob
from vlmserve.workers.logits_processors import ProcessorRow, apply_processors
from vlmserve.workers.penalties import PenaltyCounts, dense_counts, sparse_counts

GREEDY_TEMPERATURE = 1e-5  # below this a row takes the argmax
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, count: int) -> int:
    """Generator seed for the token a request seeded with `seed` samples after `count` tokens.

    Hashing twice keeps nearby (seed, count) pairs from giving related streams.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ count)


def is_plain_greedy(params: SamplingParams) -> bool:
    """True when a row's token is the raw logits' argmax whatever it has generated: greedy,
    no bias, penalty, min_tokens, logprobs or logits processor."""
    return (
        params.temperature < GREEDY_TEMPERATURE
        and not params.logit_bias
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.min_tokens == 0
        and params.logprobs is None
        and not params.bad_words_token_ids
        and params.grammar is None
    )


@dataclass(frozen=True)
class SamplingInput:
    """Everything `sample` needs about one step's batch, built once on the CPU side of the step.

    Rows are the step's sampling sequences in batch order. Optional fields are None when no row
    uses that feature, so a batch of plain requests pays for none of it. Token ids at or past
    the logits' vocab size are ignored (HF does the same), negative ids are invalid.
    """

    num_seqs: int
    # Rows drawn at random; the other rows are greedy.
    sample_rows: torch.Tensor  # [num_sampled] int64
    draw_seeds: list[int]  # [num_sampled], see draw_seed
    temperature: torch.Tensor | None  # [num_sampled, 1]; None when every row is greedy
    top_k: torch.Tensor | None  # [num_sampled] int64, 0 = off
    top_p: torch.Tensor | None  # [num_sampled] float32, 1 = off
    min_p: torch.Tensor | None  # [num_sampled, 1] float32, 0 = off
    # Sparse (row, token id, value) entries; see SamplingInput.build for each one's meaning.
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    # Prompt + output tokens of penalised rows: sparse (rows, ids), or [num_seqs, vocab] bool
    # from PenaltyCounts.
    seen: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None
    repetition_penalty: torch.Tensor | None  # [num_seqs, 1], 1 = off
    # Output tokens of penalised rows: sparse (rows, ids), or [num_seqs, vocab] float counts.
    output: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None
    presence_penalty: torch.Tensor | None  # [num_seqs, 1]
    frequency_penalty: torch.Tensor | None  # [num_seqs, 1]
    banned: tuple[torch.Tensor, torch.Tensor] | None  # eos/stop ids under min_tokens
    # Rows that asked for logprobs, and how many top candidates each wants.
    logprob_rows: list[int]
    num_top_logprobs: list[int]
    # The rows' logits processors; empty (and free) in a batch that has none.
    processors: tuple[ProcessorRow, ...] = ()

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        output_counts: list[int],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        eos_token_ids: list[int],
        device: torch.device | str = "cpu",
        processors: Sequence[ProcessorRow] = (),
        penalty_counts: Sequence[PenaltyCounts | None] | None = None,
    ) -> SamplingInput:
        """Gather the batch's sampling settings into device tensors.

        params, seeds, output_counts, prompt_ids and output_ids are per row. `output_counts[i]`
        is how many tokens row i has generated (the draw's position, and what min_tokens
        compares with). `prompt_ids` feed only repetition_penalty; `output_ids` feed all three
        penalties. While a row is under min_tokens, `eos_token_ids` (even with ignore_eos) and
        its stop_token_ids cannot be sampled. `processors` name their rows. With
        `penalty_counts` (per row: the counts of a penalised row, else None), the penalties
        read those and `prompt_ids` and `output_ids` are not read.
        """
        n = len(params)
        assert n == len(seeds) == len(output_counts)
        assert penalty_counts is not None or n == len(prompt_ids) == len(output_ids)

        def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, device=device)

        def column(values: list[float]) -> torch.Tensor:
            return tensor(values, torch.float32).unsqueeze(1)

        def sparse(rows: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return tensor(rows, torch.long), tensor(ids, torch.long)

        sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_TEMPERATURE]
        sp = [params[i] for i in sampled]
        any_sampled = bool(sampled)
        top_k = any_sampled and any(p.top_k > 0 for p in sp)
        top_p = any_sampled and any(p.top_p < 1.0 for p in sp)
        min_p = any_sampled and any(p.min_p > 0.0 for p in sp)

        bias_rows, bias_ids, bias_vals = [], [], []
        for i, p in enumerate(params):
            for tok, b in p.logit_bias.items():
                bias_rows.append(i)
                bias_ids.append(tok)
                bias_vals.append(b)

        rep = [p.repetition_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        any_occurrence = any(presence) or any(frequency)
        if penalty_counts is not None:
            seen, output = dense_counts(params, penalty_counts, device)
        else:
            seen, output = sparse_counts(params, prompt_ids, output_ids, device)

        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, p in enumerate(params):
            if output_counts[i] < p.min_tokens:
                ids = list(eos_token_ids) + list(p.stop_token_ids)
                ban_rows += [i] * len(ids)
                ban_ids += ids

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            num_seqs=n,
            sample_rows=tensor(sampled, torch.long),
            draw_seeds=[draw_seed(seeds[i], output_counts[i]) for i in sampled],
            temperature=column([p.temperature for p in sp]) if any_sampled else None,
            top_k=tensor([p.top_k for p in sp], torch.long) if top_k else None,
            top_p=tensor([p.top_p for p in sp], torch.float32) if top_p else None,
            min_p=column([p.min_p for p in sp]) if min_p else None,
            bias=(*sparse(bias_rows, bias_ids), tensor(bias_vals, torch.float32))
            if bias_rows
            else None,
            seen=seen,
            repetition_penalty=column(rep) if seen is not None else None,
            output=output if any_occurrence else None,
            presence_penalty=column(presence) if output is not None and any_occurrence else None,
            frequency_penalty=column(frequency) if output is not None and any_occurrence else None,
            banned=sparse(ban_rows, ban_ids) if ban_ids else None,
            logprob_rows=logprob_rows,
            num_top_logprobs=[params[i].logprobs for i in logprob_rows],
            processors=tuple(processors),
        )


def _dense(
    rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """[num_seqs, vocab] from sparse entries, summing duplicates; ids >= vocab are dropped."""
    n, vocab = shape
    # One spare column absorbs the ids past the vocab (clamped onto it), as HF does.
    out = torch.zeros(n, vocab + 1, dtype=values.dtype, device=values.device)
    out.index_put_((rows, ids.clamp(max=vocab)), values, accumulate=values.dtype != torch.bool)
    return out[:, :vocab]


def process_logits(logits: torch.Tensor, inp: SamplingInput) -> torch.Tensor:
    """Apply logit_bias, the penalties and the min_tokens mask; returns a new tensor.

    logits: [num_seqs, vocab] float32. Rows and features that need nothing are left untouched
    bit for bit (so greedy rows without them stay the raw argmax).
    """
    shape = logits.shape
    if inp.bias is not None:
        logits = logits + _dense(*inp.bias, shape)
    if inp.seen is not None:
        seen = inp.seen
        if isinstance(seen, tuple):
            seen = _dense(*seen, logits.new_ones((), dtype=torch.bool), shape)
        p = inp.repetition_penalty
        # HF semantics: shrink positive logits, grow negative ones, both toward "less likely".
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen, penalised, logits)
    if inp.output is not None:
        counts = inp.output  # [num_seqs, vocab]
        if isinstance(counts, tuple):
            counts = _dense(*counts, logits.new_ones(()), shape)
        logits = (
            logits - inp.presence_penalty * (counts > 0).float() - inp.frequency_penalty * counts
        )
    if inp.banned is not None:
        banned = _dense(*inp.banned, logits.new_ones((), dtype=torch.bool), shape)
        logits = logits.masked_fill(banned, float("-inf"))
    return logits


def _top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """Mask to -inf what falls outside each row's top-k, then outside its top-p mass.

    One ascending sort serves both (vLLM's approach); ties with the k-th logit are kept, and
    top-p always keeps the most likely token.
    """
    vocab = logits.shape[-1]
    logits_sort, order = logits.sort(dim=-1)
    if k is not None:
        k = torch.where((k <= 0) | (k > vocab), vocab, k)
        kth = logits_sort.gather(1, (vocab - k).unsqueeze(1))  # [num_sampled, 1]
        logits_sort = logits_sort.masked_fill(logits_sort < kth, float("-inf"))
    if p is not None:
        cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - p.unsqueeze(1)
        drop[:, -1] = False
        logits_sort = logits_sort.masked_fill(drop, float("-inf"))
    return logits_sort.scatter(1, order, logits_sort)


def _draw(logits: torch.Tensor, inp: SamplingInput) -> torch.Tensor:
    """Sample one token per row of the sampled rows' processed logits."""
    logits = logits / inp.temperature
    if inp.top_k is not None or inp.top_p is not None:
        logits = _top_k_top_p(logits, inp.top_k, inp.top_p)
    probs = logits.softmax(dim=-1)  # [num_sampled, vocab]
    if inp.min_p is not None:
        threshold = inp.min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    q = torch.empty_like(probs)
    gen = torch.Generator(device=probs.device)
    for row, s in enumerate(inp.draw_seeds):
        gen.manual_seed(s)
        q[row].exponential_(generator=gen)
    # A zero draw would turn a filtered token's 0 / 0 into NaN, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def sample(
    logits: torch.Tensor, inp: SamplingInput
) -> tuple[torch.Tensor, list[TokenLogprob | None] | None]:
    """Pick the next token of every row.

    logits: [num_seqs, vocab] raw model logits (cast to float32 here; not modified).
    Returns token ids [num_seqs] int64 on the logits' device, and per row a TokenLogprob (None
    for rows that did not ask) or None when no row asked. Logprobs are the raw logits'
    log_softmax, before any penalty or temperature, as vLLM reports them by default.
    """
    logits = logits.float()
    assert logits.shape[0] == inp.num_seqs

    logprobs = None
    if inp.logprob_rows:
        rows = torch.tensor(inp.logprob_rows, device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, rows), dim=-1)  # [num_lp, vocab]

    logits = process_logits(logits, inp)
    if inp.processors:
        logits = apply_processors(logits, inp.processors)
    num_sampled = len(inp.draw_seeds)
    if num_sampled and num_sampled == inp.num_seqs:
        tokens = _draw(logits, inp)
    else:
        tokens = logits.argmax(dim=-1)
        if num_sampled:
            drawn = _draw(logits.index_select(0, inp.sample_rows), inp)
            tokens = tokens.index_copy(0, inp.sample_rows, drawn)

    if logprobs is None:
        return tokens, None
    return tokens, _token_logprobs(logprobs, tokens, inp)


def _token_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, inp: SamplingInput
) -> list[TokenLogprob | None]:
    rows = torch.tensor(inp.logprob_rows, device=logprobs.device)
    chosen = logprobs.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1).tolist()
    max_top = max(inp.num_top_logprobs)
    top_vals: list[list[float]] = [[] for _ in inp.logprob_rows]
    top_ids: list[list[int]] = [[] for _ in inp.logprob_rows]
    if max_top > 0:
        vals, ids = logprobs.topk(min(max_top, logprobs.shape[-1]), dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    out: list[TokenLogprob | None] = [None] * inp.num_seqs
    for j, (row, n) in enumerate(zip(inp.logprob_rows, inp.num_top_logprobs, strict=True)):
        out[row] = TokenLogprob(chosen[j], top_ids[j][:n], top_vals[j][:n])
    return out
