"""Continuous batching: which tokens of which requests each step computes, under a token budget.

As in vLLM's v1 engine, a step gives each scheduled request `n` tokens to compute starting at
its `num_computed`; prefill, chunked prefill and decode are the same thing with different `n`.
Running requests go first (decodes, then unfinished prefill chunks), then waiting requests are
admitted while the budget, the batch size and the free blocks allow.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from vlmserve.scheduler.admission import QueueLimits, timeout_message
from vlmserve.scheduler.block_manager import BlockManager
from vlmserve.scheduler.request import Request, RequestStatus
from vlmserve.shared.messages import (
    ERROR,
    LENGTH,
    QUEUE_TIME_BUCKETS,
    STOP,
    ImageMeta,
    NewSeq,
    RequestOutput,
    SeqStep,
    StepPlan,
    StepResult,
    Submit,
)


def image_block_keys(images: list[ImageMeta], block_size: int) -> list[Hashable] | None:
    """Per-block extra prefix-cache keys: the hashes of the images each block's tokens show.

    Blocks after an image inherit it through the chained block hash; blocks before it need
    nothing; so only the blocks an image's placeholders fall in get its hash.
    """
    if not images:
        return None
    last = max(img.offset + img.length for img in images)
    keys: list[Hashable] = [None] * (-(-last // block_size))
    for img in images:
        for block in range(img.offset // block_size, -(-(img.offset + img.length) // block_size)):
            keys[block] = (*(keys[block] or ()), img.hash)
    return keys


def _needs_prompt_logits(req: Request) -> bool:
    """Whether the request still wants its prompt logprobs (they come with its first token):
    then it takes no cached prefix, whose blocks have no logits to score the prompt with."""
    return req.sampling.prompt_logprobs is not None and req.num_outputs == 0


@dataclass(slots=True)
class _Scheduled:
    """A request's share of the plan in flight, kept to register its blocks once computed."""

    request: Request
    seq_id: int
    num_computed: int  # after this step
    sample: bool


class Scheduler:
    """Owns the waiting and running queues and the block manager; speaks only shared.messages.

    The caller alternates `schedule()` (send the plan to the workers) and `update()` (with the
    plan's result); `add`, `abort` and the status counters may be called at any time between.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_batch_size: int,
        max_batched_tokens: int,
        session_len: int,
        eos_token_ids: list[int] | set[int] | tuple[int, ...],
        seed: int = 0,
        limits: QueueLimits | None = None,
        bidirectional_images: bool = False,
    ) -> None:
        """`bidirectional_images`: the model's image tokens attend to each other both ways
        (Gemma 3), so no prefill chunk may end inside an image (see `_chunk`)."""
        if max_batched_tokens < max_batch_size:
            # Otherwise decodes past the budget would starve behind older ones every step.
            raise ValueError(
                f"max_batched_tokens ({max_batched_tokens}) < max_batch_size ({max_batch_size})"
            )
        self.block_manager = BlockManager(num_blocks, block_size)
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.session_len = session_len
        # A sequence can never hold more KV than the whole cache; past that it ends as LENGTH
        # rather than preempting itself forever.
        self.max_kv_tokens = num_blocks * block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.limits = limits or QueueLimits()  # no caps, no queue timeout
        self.bidirectional_images = bidirectional_images
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; the last is the newest
        self._requests: dict[str, Request] = {}
        self._freed_seq_ids: list[int] = []
        self._in_flight: list[_Scheduled] = []
        self._in_flight_step: int | None = None
        self._step_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rng = random.Random(seed)
        self.num_preemptions = 0  # since start, for status and benchmarks
        # Prefix cache since start, in prompt tokens (vLLM's prefix_cache_queries / _hits):
        # the tokens each admission looked up and those the cache already held.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Queue time (receipt to first admission) per QUEUE_TIME_BUCKETS bucket, and its sum.
        self.queue_time_counts = [0] * (len(QUEUE_TIME_BUCKETS) + 1)
        self.queue_time_sum = 0.0

    # ---- status ------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests in -------------------------------------------------------------------------

    def add(self, submit: Submit, image_frames: list | None = None) -> RequestOutput | None:
        """Queue a request, or return its ERROR output if it can never run.

        `image_frames` are the arrays of `submit.images`, passed on to the workers untouched.
        """
        error = self._check(submit)
        if error is not None:
            return RequestOutput(
                submit.request_id, [], finish_reason=ERROR, error=error, rejected=True
            )
        busy = self.limits.refusal(self.waiting, len(submit.token_ids))
        if busy is not None:
            return RequestOutput(
                submit.request_id, [], finish_reason=ERROR, error=busy, overloaded=True
            )
        sp = submit.sampling
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
        req = Request(
            request_id=submit.request_id,
            frontend_id=submit.frontend_id,
            token_ids=list(submit.token_ids),
            prompt_len=len(submit.token_ids),
            sampling=sp,
            seed=seed,
            extra_keys=image_block_keys(submit.images, self.block_manager.block_size),
            images=list(submit.images),
            image_frames=list(image_frames or []),
            arrived_at=time.monotonic(),
        )
        self._requests[req.request_id] = req
        self.waiting.append(req)
        return None

    def _check(self, submit: Submit) -> str | None:
        n = len(submit.token_ids)
        if submit.request_id in self._requests:
            return f"request id {submit.request_id!r} is already in use"
        if n == 0:
            return "the prompt is empty"
        if n >= self.session_len:
            return f"the prompt has {n} tokens; the session length is {self.session_len}"
        need = self.block_manager.blocks_for(n)
        if need > self.block_manager.num_blocks:
            return (
                f"the prompt needs {need} KV blocks; the cache has only "
                f"{self.block_manager.num_blocks}"
            )
        if submit.sampling.max_tokens < 1:
            return f"max_tokens must be at least 1, got {submit.sampling.max_tokens}"
        return None

    def abort(self, request_id: str) -> None:
        """Drop a request now, waiting or running; unknown (e.g. finished) ids are ignored."""
        req = self._requests.get(request_id)
        if req is None:
            return
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
        self._finish(req)

    def expire(self, now: float) -> dict[str, list[RequestOutput]]:
        """Abort the requests past --queue-timeout without a first token; their outputs."""
        outputs: dict[str, list[RequestOutput]] = {}
        for req in self.limits.expired(self._requests.values(), now):
            error = timeout_message(now - req.arrived_at, self.limits.timeout_s)
            out = RequestOutput(
                req.request_id, [], finish_reason=ERROR, error=error, overloaded=True
            )
            outputs.setdefault(req.frontend_id, []).append(out)
            self.abort(req.request_id)
        return outputs

    # ---- planning ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Plan the next step; None when there is nothing to compute and nothing to free."""
        budget = self.max_batched_tokens
        new_seqs: list[NewSeq] = []
        seqs: list[SeqStep] = []
        scheduled: list[_Scheduled] = []
        scheduled_ids: set[str] = set()
        preempted = False

        decodes = [r for r in self.running if r.remaining == 1]
        prefills = [r for r in self.running if r.remaining > 1]
        for req in decodes + prefills:
            if budget <= 0:  # a chunk may run past the budget to the end of an image
                break
            if req.status is not RequestStatus.RUNNING:  # preempted for an earlier one
                continue
            n = self._chunk(req, req.num_computed, min(req.remaining, budget))
            while not self.block_manager.can_allocate(req.block_table, req.num_computed + n):
                victim = self._newest_unscheduled(scheduled_ids, exclude=req) or req
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            self.block_manager.allocate(req.block_table, req.num_computed + n)
            seqs.append(self._step(req, n, known=True))
            scheduled.append(_Scheduled(req, req.seq_id, req.num_computed, seqs[-1].sample))
            scheduled_ids.add(req.request_id)
            budget -= n

        # Like vLLM v1, admit nothing in a step that had to preempt: blocks are short, and a
        # just-preempted request at the head of the queue would only thrash.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_batch_size
        ):
            req = self.waiting[0]
            n = self._admit(req, budget)
            if n == 0:
                break  # not enough blocks; keep FIFO order rather than let others jump ahead
            self.waiting.popleft()
            self.running.append(req)
            new_seqs.append(
                NewSeq(
                    req.seq_id,
                    list(req.token_ids),
                    req.prompt_len,
                    req.sampling,
                    req.seed,
                    req.images,
                )
            )
            seqs.append(self._step(req, n, known=False))
            scheduled.append(_Scheduled(req, req.seq_id, req.num_computed, seqs[-1].sample))
            budget -= n

        if not seqs and not self._freed_seq_ids:
            return None
        plan = StepPlan(next(self._step_ids), new_seqs, seqs, self._freed_seq_ids)
        self._freed_seq_ids = []
        self._in_flight = scheduled
        self._in_flight_step = plan.step_id
        return plan

    def plan_frames(self, plan: StepPlan) -> list:
        """The image array frames that follow `plan`: those of its new sequences, in order."""
        if not any(new.images for new in plan.new_seqs):
            return []
        by_seq = {r.seq_id: r for r in self.running}
        return [f for new in plan.new_seqs for f in by_seq[new.seq_id].image_frames]

    def _admit(self, req: Request, budget: int) -> int:
        """Take cached prefix blocks and blocks for the first chunk; return its size (0: none)."""
        bm = self.block_manager
        cached = [] if _needs_prompt_logits(req) else bm.match_prefix(req.token_ids, req.extra_keys)
        if len(cached) * bm.block_size >= req.num_tokens:
            # Fully cached: recompute the last block so there is a token to sample from.
            cached = cached[:-1]
        num_cached = len(cached) * bm.block_size
        n = self._chunk(req, num_cached, min(req.num_tokens - num_cached, budget))
        if not bm.can_allocate([], num_cached + n, cached):
            return 0
        bm.allocate(req.block_table, num_cached + n, cached)
        req.num_computed = num_cached
        req.num_hashed_blocks = len(cached)
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_cached
            self._observe_queue_time(time.monotonic() - req.arrived_at)
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += num_cached
        req.seq_id = next(self._seq_ids)
        req.status = RequestStatus.RUNNING
        return n

    def _chunk(self, req: Request, start: int, n: int) -> int:
        """The size of a chunk of `n` tokens from `start`, moved so that it does not end inside
        an image whose tokens attend both ways: back to the image's start, or, when the chunk
        starts at or inside the image, on to its end (past the step's budget if need be)."""
        if not self.bidirectional_images:
            return n
        end = start + n
        for image in req.images:
            first, last = image.offset, image.offset + image.length
            if first < end < last:
                return first - start if first > start else last - start
        return n

    def _observe_queue_time(self, seconds: float) -> None:
        self.queue_time_counts[bisect.bisect_left(QUEUE_TIME_BUCKETS, seconds)] += 1
        self.queue_time_sum += seconds

    def _step(self, req: Request, n: int, known: bool) -> SeqStep:
        """This step's SeqStep for `req`; advances its computed and sent counters."""
        assert req.seq_id is not None
        step = SeqStep(
            seq_id=req.seq_id,
            start=req.num_computed,
            num_tokens=n,
            new_block_ids=req.block_table[req.num_sent_blocks :],
            new_token_ids=req.token_ids[req.num_sent :] if known else [],
            sample=req.num_computed + n == req.num_tokens,
        )
        # Optimistic, as in vLLM v1: count the tokens as computed once planned; `update` only
        # appends the sampled token, and a failed step fails everything anyway.
        req.num_computed += n
        req.num_sent = req.num_tokens
        req.num_sent_blocks = len(req.block_table)
        return step

    def _newest_unscheduled(self, scheduled_ids: set[str], exclude: Request) -> Request | None:
        for r in reversed(self.running):
            if r is not exclude and r.request_id not in scheduled_ids:
                return r
        return None

    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks and requeue it first; it recomputes from scratch."""
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.num_sent = 0
        req.num_sent_blocks = 0
        req.num_hashed_blocks = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    # ---- results -----------------------------------------------------------------------------

    def update(self, result: StepResult) -> dict[str, list[RequestOutput]]:
        """Apply the sampled tokens of the plan in flight; return the outputs per frontend id.

        Raises ValueError for a result of another step than the last planned one: the workers
        run plans in order, so a mismatch is a bug, not something to guess around.
        """
        if result.step_id != self._in_flight_step:
            raise ValueError(f"result for step {result.step_id}, in flight: {self._in_flight_step}")
        sampled: dict[int, Request] = {}
        outputs: dict[str, list[RequestOutput]] = {}
        for s in self._in_flight:
            if s.request.seq_id != s.seq_id:
                continue  # aborted, finished or preempted since
            req = s.request
            if s.seq_id in result.failed:  # its KV was never computed: register nothing
                self._fail_one(req, result.failed[s.seq_id], outputs)
                continue
            req.num_hashed_blocks = self.block_manager.register_full_blocks(
                req.block_table,
                req.token_ids,
                s.num_computed,
                req.num_hashed_blocks,
                req.extra_keys,
            )
            if s.sample:
                sampled[s.seq_id] = req
        self._in_flight = []
        self._in_flight_step = None

        for i, (seq_id, token) in enumerate(zip(result.seq_ids, result.token_ids, strict=True)):
            req = sampled.get(seq_id)
            if req is None:
                continue
            lp = result.logprobs[i] if result.logprobs is not None else None
            req.token_ids.append(token)
            reason = self._finish_reason(req, token)
            out = RequestOutput(
                req.request_id,
                [token],
                logprobs=[lp] if lp is not None else None,
                finish_reason=reason,
                num_cached_tokens=req.num_cached_tokens,
                prompt_logprobs=result.prompt_logprobs.get(seq_id),
            )
            outputs.setdefault(req.frontend_id, []).append(out)
            if reason is not None:
                self.running.remove(req)
                self._finish(req)
        return outputs

    def _finish_reason(self, req: Request, token: int) -> str | None:
        sp = req.sampling
        if req.num_outputs >= sp.min_tokens and (
            (token in self.eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids
        ):
            return STOP
        if (
            req.num_outputs >= sp.max_tokens
            or req.num_tokens >= self.session_len
            or req.num_tokens > self.max_kv_tokens
        ):
            return LENGTH
        return None

    def _fail_one(self, req: Request, error: str, outputs: dict[str, list[RequestOutput]]) -> None:
        """End a running request whose own input the workers refused (a 400, not a 503)."""
        out = RequestOutput(req.request_id, [], finish_reason=ERROR, error=error, rejected=True)
        outputs.setdefault(req.frontend_id, []).append(out)
        self.running.remove(req)
        self._finish(req)

    def fail_all(self, error: str) -> dict[str, list[RequestOutput]]:
        """End every waiting and running request with ERROR and `error` (workers are gone)."""
        outputs: dict[str, list[RequestOutput]] = {}
        for req in [*self.running, *self.waiting]:
            out = RequestOutput(
                req.request_id,
                [],
                finish_reason=ERROR,
                error=error,
                num_cached_tokens=req.num_cached_tokens,
            )
            outputs.setdefault(req.frontend_id, []).append(out)
            self._finish(req)
        self.running.clear()
        self.waiting.clear()
        self._in_flight = []
        self._in_flight_step = None
        return outputs

    # ---- helpers -----------------------------------------------------------------------------

    def _release(self, req: Request) -> None:
        """Free the blocks and tell the workers (next plan) to forget the seq id."""
        self.block_manager.free(req.block_table)
        req.block_table = []
        if req.seq_id is not None:
            self._freed_seq_ids.append(req.seq_id)
            req.seq_id = None

    def _finish(self, req: Request) -> None:
        """Forget a request already removed from its queue."""
        self._release(req)
        req.status = RequestStatus.FINISHED
        del self._requests[req.request_id]
