"""Every message that crosses a ZeroMQ socket, one tagged union per socket.

Wire map (see ../DESIGN.md):
  frontend  --PUSH FrontendMsg-->  scheduler   (requests address)
  scheduler --PUB  EngineMsg-->    frontends   (tokens address, topic = frontend id)
  scheduler --PUSH StepPlan-->     worker rank (plans address, one per rank)
  worker    --PUSH WorkerMsg-->    scheduler   (results address)

Hot messages are array-like structs without GC tracking: they are encoded every step.
"""

from __future__ import annotations

import msgspec

HOT = {"array_like": True, "omit_defaults": True, "gc": False}

# Finish reasons, as OpenAI names them (plus the engine's own "abort" and "error").
STOP, LENGTH, ABORT, ERROR = "stop", "length", "abort", "error"


# Kinds of output constraint (Grammar.kind); each is compiled by xgrammar on the workers.
GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "ebnf")


class Grammar(msgspec.Struct, frozen=True, **HOT):
    """A constraint on a request's output, ending in a per-step token mask on the workers.

    Every request field that constrains output (`response_format`, vLLM's `structured_outputs`
    and `guided_*`, LMDeploy's `regex_schema`, a `tool_choice` that forces a call) becomes one
    of these in the frontend. `spec` is the JSON schema text (json_schema), the regular
    expression (regex), a JSON list of the allowed strings (choice) or the EBNF grammar (ebnf);
    empty for json_object (any JSON object).
    """

    kind: str
    spec: str = ""


class SamplingParams(msgspec.Struct, frozen=True, **HOT):
    """How to pick tokens for one request; validated by the frontend."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None = none; N = the chosen token's and the top N
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    logit_bias: dict[int, float] = {}
    # vLLM's `bad_words`, each tokenized by the frontend; see workers/logits_processors.py.
    bad_words_token_ids: list[list[int]] = []
    grammar: Grammar | None = None
    # vLLM's `prompt_logprobs`: each prompt token's logprob given the tokens before it, and
    # the top N at each position (see PromptLogprobs); None = none.
    prompt_logprobs: int | None = None


class ArrayMeta(msgspec.Struct, frozen=True, **HOT):
    """An array that travels as its own ZeroMQ frame after the message (raw bytes, no pickle)."""

    name: str
    dtype: str
    shape: list[int]


class ImageMeta(msgspec.Struct, frozen=True, **HOT):
    """One image of a prompt: its placeholder tokens are token_ids[offset:offset + length].

    `hash` is of the image's content: the workers' encoder cache and the prefix cache key on
    it, so two images behind the same placeholder ids are never confused. Its preprocessed
    arrays (pixel values, sizes, grids) follow the message as frames, in order.
    """

    hash: str
    offset: int
    length: int
    arrays: list[ArrayMeta]


# ---- frontend -> scheduler ------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True, **HOT):
    """Sent by a frontend until it sees HelloAck on its topic (the slow-joiner guard)."""

    frontend_id: str


class Submit(msgspec.Struct, tag=True, **HOT):
    request_id: str
    frontend_id: str
    token_ids: list[int]
    sampling: SamplingParams
    images: list[ImageMeta] = []


class Abort(msgspec.Struct, tag=True, **HOT):
    request_id: str


FrontendMsg = Hello | Submit | Abort


# ---- scheduler -> frontends -----------------------------------------------------------------


class TokenLogprob(msgspec.Struct, frozen=True, **HOT):
    """Log-probability of a sampled token and of the top N candidates at that position."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class PromptLogprobs(msgspec.Struct, frozen=True, **HOT):
    """Log-probabilities of a prompt's tokens, each given the tokens before it.

    Entry i is about prompt token i + 1 (the first token has nothing before it): its logprob,
    its rank (1 = the most likely token there; ties count as ahead, as vLLM counts) and the
    top N candidates at that position, best first. All from the raw logits.
    """

    logprobs: list[float] = []
    ranks: list[int] = []
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []


class RequestOutput(msgspec.Struct, **HOT):
    """What one request got in one step. `finish_reason` is set on its last output;
    `prompt_logprobs`, when the request asked for them, come once, with its first output."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    rejected: bool = False  # the request itself can never run here (a 400, not a 503)
    # The engine is too busy to take it (a full queue) or to start it in time (queue
    # timeout): a 503 with Retry-After, which the client may retry.
    overloaded: bool = False
    prompt_logprobs: PromptLogprobs | None = None


class TokenBatch(msgspec.Struct, tag=True, **HOT):
    """Everything one frontend's requests got in one step; `seq` counts per topic."""

    seq: int
    outputs: list[RequestOutput]


class HelloAck(msgspec.Struct, tag=True, **HOT):
    seq: int


class EngineStatus(msgspec.Struct, tag=True, **HOT):
    """Published to every frontend on a fixed topic, twice a second."""

    workers_alive: bool
    instance: str = ""  # new on every scheduler start: frontends say hello again on a change
    num_running: int = 0
    num_waiting: int = 0
    free_blocks: int = 0
    # Cumulative since start, for benchmarks and tests: steps run, preemptions, the
    # scheduler's own time (planning, updating, publishing) and the time steps took.
    steps: int = 0
    preemptions: int = 0
    scheduler_s: float = 0.0
    step_s: float = 0.0
    # For /metrics: the cache size, and cumulative prefix-cache and (rank 0's) encoder-cache
    # lookups and hits; prefix ones in tokens as vLLM counts them, encoder ones in images.
    total_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    encoder_cache_queries: int = 0
    encoder_cache_hits: int = 0
    # Seconds from the scheduler's receipt of each request to its first admission: how many
    # fell in each of QUEUE_TIME_BUCKETS (then one count past the last), and their sum.
    queue_time_counts: list[int] = []
    queue_time_sum: float = 0.0


# vLLM's request-latency buckets (request_queue_time_seconds), in seconds.
QUEUE_TIME_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

EngineMsg = TokenBatch | HelloAck | EngineStatus
STATUS_TOPIC = b"~status"


# ---- scheduler -> workers -------------------------------------------------------------------


class NewSeq(msgspec.Struct, **HOT):
    """A sequence the workers have not seen (a new request, or one resumed after preemption).

    `token_ids` are all its tokens so far; `prompt_len` of them are the prompt.
    """

    seq_id: int
    token_ids: list[int]
    prompt_len: int
    sampling: SamplingParams
    seed: int
    images: list[ImageMeta] = []  # their arrays follow the StepPlan as frames, in order


class SeqStep(msgspec.Struct, **HOT):
    """One sequence's share of a step: compute `num_tokens` tokens from `start`.

    `new_token_ids` are tokens appended since the workers last heard of it (the token
    sampled in the previous step); `new_block_ids` extend its block table.
    """

    seq_id: int
    start: int
    num_tokens: int
    new_block_ids: list[int] = []
    new_token_ids: list[int] = []
    sample: bool = True


class StepPlan(msgspec.Struct, tag=True, **HOT):
    step_id: int
    new_seqs: list[NewSeq] = []
    seqs: list[SeqStep] = []
    freed_seq_ids: list[int] = []


class Shutdown(msgspec.Struct, tag=True, **HOT):
    reason: str


SchedulerMsg = StepPlan | Shutdown


# ---- workers -> scheduler -------------------------------------------------------------------


class WorkerReady(msgspec.Struct, tag=True, **HOT):
    rank: int
    num_blocks: int
    device: str


class Heartbeat(msgspec.Struct, tag=True, **HOT):
    rank: int
    # One per worker process: a new one for a rank means the rank's old process died and a
    # supervisor started another, which the group must not mistake for the same rank.
    instance: str = ""


class StepResult(msgspec.Struct, tag=True, **HOT):
    """Rank 0's answer to a StepPlan: one sampled token per sequence that sampled."""

    step_id: int
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None = None  # aligned with seq_ids when any asked
    # Sequences left out of the step because their own input failed (an image the vision
    # tower could not encode), with the reason: they end alone, the others go on.
    failed: dict[int, str] = {}
    # Rank 0's encoder cache since it started (images looked up, images found): cumulative,
    # so the scheduler keeps the latest.
    encoder_cache_queries: int = 0
    encoder_cache_hits: int = 0
    # Sequences that asked for prompt logprobs and sampled their first token in this step.
    prompt_logprobs: dict[int, PromptLogprobs] = {}


class WorkerFailed(msgspec.Struct, tag=True, **HOT):
    """A worker hit an error it cannot recover from; the scheduler fails everything."""

    rank: int
    error: str


WorkerMsg = WorkerReady | Heartbeat | StepResult | WorkerFailed
