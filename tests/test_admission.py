"""Admission control in the scheduler, exactly: queue caps and the queue timeout (no torch).

A refused Submit is answered by `add` itself (no step planned); an expired request leaves
its queue and gives back every block it held.
"""

import time

from vlmserve.scheduler.admission import QueueLimits
from vlmserve.scheduler.scheduler import Scheduler
from vlmserve.shared.messages import ERROR, SamplingParams, StepResult, Submit

BS = 4
NUM_BLOCKS = 16


def make(limits: QueueLimits, max_batch_size: int = 4) -> Scheduler:
    return Scheduler(NUM_BLOCKS, BS, max_batch_size, 16, 64, [2], limits=limits)


def submit(rid: str, num_tokens: int = 5, fid: str = "fe") -> Submit:
    return Submit(rid, fid, list(range(10, 10 + num_tokens)), SamplingParams(max_tokens=4))


def test_max_queued_requests_refuses_at_once_and_admits_again_when_the_queue_moves() -> None:
    sched = make(QueueLimits(max_requests=2), max_batch_size=1)
    assert sched.add(submit("a")) is None
    assert sched.add(submit("b")) is None
    refused = sched.add(submit("c"))
    assert refused is not None and refused.overloaded and not refused.rejected
    assert refused.finish_reason == ERROR and refused.token_ids == []
    assert "--max-queued-requests 2" in refused.error
    assert sched.num_waiting == 2 and sched.num_free_blocks == NUM_BLOCKS  # nothing ran
    assert sched.schedule() is not None  # "a" runs (batch of 1): one place in the queue
    assert sched.num_waiting == 1
    assert sched.add(submit("c")) is None
    assert sched.add(submit("d")).overloaded


def test_max_queued_tokens_counts_waiting_prompts_and_an_empty_queue_takes_anything() -> None:
    sched = make(QueueLimits(max_tokens=10))
    assert sched.add(submit("long", num_tokens=20)) is None  # alone in the queue: served
    refused = sched.add(submit("x", num_tokens=1))
    assert refused.overloaded and "--max-queued-tokens 10" in refused.error
    sched.schedule()  # "long" starts; the queue is empty again
    assert sched.add(submit("a", num_tokens=6)) is None
    assert sched.add(submit("b", num_tokens=5)).overloaded  # 6 + 5 > 10
    assert sched.add(submit("c", num_tokens=4)) is None  # 6 + 4 = 10
    assert [r.request_id for r in sched.waiting] == ["a", "c"]


def test_a_bad_request_is_a_400_even_when_the_queue_is_full() -> None:
    sched = make(QueueLimits(max_requests=1))
    sched.add(submit("a"))
    empty = sched.add(Submit("e", "fe", [], SamplingParams()))
    assert empty.rejected and not empty.overloaded


def test_queue_timeout_ends_waiting_and_unstarted_requests_and_frees_their_blocks() -> None:
    sched = make(QueueLimits(timeout_s=5.0), max_batch_size=2)
    for rid in ("started", "prefilling", "waiting"):
        sched.add(submit(rid, fid=f"fe-{rid}"))
    plan = sched.schedule()  # "started" and "prefilling" admitted; "waiting" waits
    started_seq = next(r.seq_id for r in sched.running if r.request_id == "started")
    sched.update(StepResult(plan.step_id, [started_seq], [7]))  # only "started" has a token
    plan = sched.schedule()  # a step in flight that holds the others' blocks
    prefilling = next(r for r in sched.running if r.request_id == "prefilling")
    held = list(prefilling.block_table)
    assert held and sched.num_free_blocks < NUM_BLOCKS

    assert sched.expire(time.monotonic()) == {}  # nobody waited 5 s yet
    outputs = sched.expire(time.monotonic() + 6.0)
    assert set(outputs) == {"fe-prefilling", "fe-waiting"}
    for fid, [out] in outputs.items():
        assert out.request_id == fid[3:] and out.overloaded and out.finish_reason == ERROR
        assert "--queue-timeout 5" in out.error
    assert [r.request_id for r in sched.running] == ["started"] and sched.num_waiting == 0
    # Only "started" holds blocks now; the expired one's come back and its seq is forgotten.
    started = sched.running[0]
    assert sched.num_free_blocks == NUM_BLOCKS - len(started.block_table)
    assert not set(held) & set(started.block_table)

    # The step in flight still carried "prefilling": its sampled token is dropped.
    seqs = [s.seq_id for s in plan.seqs if s.sample]
    outs = sched.update(StepResult(plan.step_id, seqs, [7] * len(seqs)))
    assert [o.request_id for lst in outs.values() for o in lst] == ["started"]
    assert prefilling.seq_id is None and sched.schedule().freed_seq_ids == [1]


def test_no_limits_take_everything() -> None:
    sched = make(QueueLimits())
    assert all(sched.add(submit(f"r{i}")) is None for i in range(50))
    assert sched.expire(time.monotonic() + 3600) == {}
