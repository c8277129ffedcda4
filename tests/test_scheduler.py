"""Exact tests of the scheduler, driven with fake worker results (no torch)."""

import pytest

from vlmserve.scheduler.request import RequestStatus
from vlmserve.scheduler.scheduler import Scheduler
from vlmserve.shared.messages import (
    ERROR,
    LENGTH,
    STOP,
    NewSeq,
    RequestOutput,
    SamplingParams,
    SeqStep,
    StepPlan,
    StepResult,
    Submit,
    TokenLogprob,
)

BS = 4
EOS = 2


def make(
    num_blocks: int = 16,
    max_batch_size: int = 4,
    max_batched_tokens: int = 16,
    session_len: int = 64,
) -> Scheduler:
    return Scheduler(num_blocks, BS, max_batch_size, max_batched_tokens, session_len, [EOS])


def submit(rid: str, tokens: list[int], fid: str = "fe", **sampling) -> Submit:
    return Submit(rid, fid, tokens, SamplingParams(seed=1, **sampling))


def result(plan: StepPlan, token: int | dict[int, int] = 7) -> StepResult:
    """Rank 0's answer: `token` (or token per seq id) for every seq that samples."""
    ids = [s.seq_id for s in plan.seqs if s.sample]
    toks = [token[i] if isinstance(token, dict) else token for i in ids]
    return StepResult(plan.step_id, ids, toks)


def step(sched: Scheduler, token: int | dict[int, int] = 7):
    plan = sched.schedule()
    assert plan is not None
    return plan, sched.update(result(plan, token))


def outputs_of(outs: dict[str, list[RequestOutput]], rid: str) -> list[RequestOutput]:
    return [o for lst in outs.values() for o in lst if o.request_id == rid]


def test_chunked_prefill_then_decode():
    sched = make(max_batched_tokens=8)
    prompt = list(range(10, 30))  # 20 tokens
    assert sched.add(submit("a", prompt, max_tokens=3)) is None

    plan = sched.schedule()
    assert plan.step_id == 0
    assert plan.new_seqs == [NewSeq(0, prompt, 20, SamplingParams(seed=1, max_tokens=3), 1)]
    assert plan.seqs == [SeqStep(0, 0, 8, [0, 1], [], False)]
    assert sched.update(result(plan)) == {}

    plan = sched.schedule()
    assert (plan.step_id, plan.new_seqs) == (1, [])
    assert plan.seqs == [SeqStep(0, 8, 8, [2, 3], [], False)]
    assert sched.update(result(plan)) == {}

    plan = sched.schedule()
    assert plan.seqs == [SeqStep(0, 16, 4, [4], [], True)]
    assert sched.update(result(plan)) == {"fe": [RequestOutput("a", [7])]}

    plan = sched.schedule()  # decode: the sampled token is sent along, one more block
    assert plan.seqs == [SeqStep(0, 20, 1, [5], [7], True)]
    assert sched.update(result(plan, 8)) == {"fe": [RequestOutput("a", [8])]}

    plan = sched.schedule()
    assert plan.seqs == [SeqStep(0, 21, 1, [], [8], True)]
    assert sched.update(result(plan, 9)) == {"fe": [RequestOutput("a", [9], finish_reason=LENGTH)]}
    assert sched.num_free_blocks == 16 and not sched.has_unfinished

    plan = sched.schedule()  # only tells the workers to forget seq 0
    assert plan == StepPlan(5, [], [], [0])
    assert sched.update(StepResult(5, [], [])) == {}
    assert sched.schedule() is None


def test_decodes_get_the_budget_before_prefill_chunks():
    sched = make(max_batched_tokens=8)
    sched.add(submit("a", [1, 3]))
    sched.add(submit("b", list(range(10, 40))))  # 30 tokens
    plan, _ = step(sched)
    assert [(s.seq_id, s.start, s.num_tokens) for s in plan.seqs] == [(0, 0, 2), (1, 0, 6)]

    plan, outs = step(sched)
    assert [(s.seq_id, s.start, s.num_tokens, s.sample) for s in plan.seqs] == [
        (0, 2, 1, True),
        (1, 6, 7, False),
    ]
    assert outputs_of(outs, "a") == [RequestOutput("a", [7])]

    # Admission order cannot put a prefilling request ahead of a decoding one today; force it
    # to check that decodes still come first rather than in queue order.
    sched.running.reverse()
    plan = sched.schedule()
    assert [(s.seq_id, s.start, s.num_tokens) for s in plan.seqs] == [(0, 3, 1), (1, 13, 7)]


def test_max_batch_size_caps_running():
    sched = make(max_batch_size=2)
    for rid in "abc":
        sched.add(submit(rid, [1, 3, 4], max_tokens=1 if rid == "a" else 3))
    plan = sched.schedule()
    assert [n.seq_id for n in plan.new_seqs] == [0, 1]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    outs = sched.update(result(plan))
    assert outs["fe"][0] == RequestOutput("a", [7], finish_reason=LENGTH)

    plan, _ = step(sched)  # "a" finished: room for "c"
    assert [s.seq_id for s in plan.seqs] == [1, 2]
    assert [n.seq_id for n in plan.new_seqs] == [2]
    assert plan.freed_seq_ids == [0]
    assert (sched.num_running, sched.num_waiting) == (2, 0)


def test_preempts_the_newest_and_resumes_it_later():
    sched = make(num_blocks=4)
    prompts = {"a": [10, 11, 12, 13], "b": [20, 21, 22, 23], "c": [30, 31, 32, 33]}
    for rid, prompt in prompts.items():
        sched.add(submit(rid, prompt, max_tokens=2))
    plan, _ = step(sched)  # one block each: 0 1 2
    assert [s.new_block_ids for s in plan.seqs] == [[0], [1], [2]]
    c = sched._requests["c"]

    plan = sched.schedule()  # each decode needs a 2nd block; one is free
    assert plan.seqs == [SeqStep(0, 4, 1, [3], [7], True), SeqStep(1, 4, 1, [2], [7], True)]
    assert plan.freed_seq_ids == [2]
    assert plan.new_seqs == []
    assert c.status is RequestStatus.WAITING and c.block_table == [] and c.seq_id is None
    assert (c.num_computed, c.num_sent, c.token_ids) == (0, 0, [30, 31, 32, 33, 7])
    assert list(sched.waiting) == [c] and sched.num_free_blocks == 0
    outs = sched.update(result(plan))
    assert outs == {
        "fe": [
            RequestOutput("a", [7], finish_reason=LENGTH),
            RequestOutput("b", [7], finish_reason=LENGTH),
        ]
    }
    assert sched.num_free_blocks == 4

    plan, outs = step(sched, 8)  # resumed: recomputes prompt + output, same prompt_len
    assert plan.new_seqs == [NewSeq(3, [30, 31, 32, 33, 7], 4, c.sampling, 1)]
    assert plan.seqs == [SeqStep(3, 0, 5, [3, 0], [], True)]
    assert plan.freed_seq_ids == [0, 1]
    assert outs == {"fe": [RequestOutput("c", [8], finish_reason=LENGTH)]}
    assert not sched.has_unfinished and sched.num_free_blocks == 4


def test_preempts_itself_when_everyone_else_is_scheduled():
    sched = make(num_blocks=3)
    sched.add(submit("a", [10, 11, 12, 13], max_tokens=3))
    sched.add(submit("b", [20, 21, 22, 23], max_tokens=3))
    step(sched)
    plan = sched.schedule()  # "a" takes the last block; "b" has no one newer to evict
    assert plan.seqs == [SeqStep(0, 4, 1, [2], [7], True)]
    assert plan.freed_seq_ids == [1]
    assert [r.request_id for r in sched.waiting] == ["b"]
    assert sched.num_free_blocks == 1  # b's block, freed
    sched.update(result(plan))

    # "b" waits (no room to recompute 5 tokens beside "a") until "a" finishes.
    plan, outs = step(sched)
    assert [s.seq_id for s in plan.seqs] == [0] and plan.new_seqs == []
    assert outs == {"fe": [RequestOutput("a", [7], finish_reason=LENGTH)]}
    plan, _ = step(sched)
    assert plan.new_seqs[0].seq_id == 2 and plan.new_seqs[0].token_ids == [20, 21, 22, 23, 7]
    while sched.has_unfinished:
        step(sched)
    assert sched.num_free_blocks == 3


def test_abort_waiting_and_running():
    sched = make(num_blocks=8, max_batch_size=1)
    sched.add(submit("a", list(range(10, 20))))
    sched.add(submit("b", [1, 3]))
    step(sched)
    assert sched.num_free_blocks == 5 and sched.num_waiting == 1

    sched.abort("b")  # waiting: just gone
    assert sched.num_waiting == 0 and sched.num_free_blocks == 5
    sched.abort("a")  # running: blocks back at once
    assert sched.num_running == 0 and sched.num_free_blocks == 8
    sched.abort("a")  # unknown now: ignored
    sched.abort("nope")

    sched.add(submit("c", [1, 3]))
    plan = sched.schedule()
    assert plan.freed_seq_ids == [0]
    assert [n.seq_id for n in plan.new_seqs] == [1]


def test_abort_while_step_in_flight_drops_its_token():
    sched = make()
    sched.add(submit("a", [1, 3]))
    sched.add(submit("b", [1, 4]))
    plan = sched.schedule()
    sched.abort("b")
    assert sched.update(result(plan)) == {"fe": [RequestOutput("a", [7])]}
    assert sched.schedule().freed_seq_ids == [1]


@pytest.mark.parametrize(
    ("sampling", "tokens", "reason"),
    [
        ({}, [5, EOS], STOP),
        ({"stop_token_ids": [9]}, [5, 9], STOP),
        ({"min_tokens": 3, "stop_token_ids": [9]}, [EOS, 9, EOS], STOP),
        ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], LENGTH),
        ({"ignore_eos": True, "stop_token_ids": [EOS]}, [5, EOS], STOP),
        ({"max_tokens": 4}, [5, 6, 5, 6], LENGTH),
        ({"max_tokens": 50}, [5, 6, 5, 6, 5], LENGTH),  # 5 + 5 tokens = session_len 10
    ],
)
def test_finish_reasons(sampling, tokens, reason):
    sched = make(session_len=10)
    sched.add(submit("a", [1, 3, 4, 5, 6], **sampling))
    got = []
    for i, token in enumerate(tokens):
        _, outs = step(sched, token)
        (out,) = outs["fe"]
        got.append(out.token_ids[0])
        assert out.finish_reason == (reason if i == len(tokens) - 1 else None)
    assert got == tokens
    assert not sched.has_unfinished and sched.num_free_blocks == 16


def test_logprobs_and_frontends():
    sched = make()
    sched.add(submit("a", [1, 3], fid="f1"))
    sched.add(submit("b", [1, 4], fid="f2"))
    plan = sched.schedule()
    lp = TokenLogprob(-0.5, [7], [-0.5])
    outs = sched.update(StepResult(plan.step_id, [0, 1], [7, 8], [lp, None]))
    assert outs == {
        "f1": [RequestOutput("a", [7], logprobs=[lp])],
        "f2": [RequestOutput("b", [8])],
    }


def test_prefix_sharing_after_the_first_step():
    sched = make()
    prefix = list(range(100, 108))  # two full blocks
    sched.add(submit("a", prefix + [1, 2]))
    step(sched)  # computed and registered: blocks 0 1 (2 holds the tail)
    sched.add(submit("b", prefix + [3, 4, 5]))
    sched.add(submit("c", prefix))  # fully cached: backs off one block to have a token

    plan, outs = step(sched)
    a, b, c = (sched._requests[r] for r in "abc")
    assert plan.seqs == [
        SeqStep(0, 10, 1, [], [7], True),
        SeqStep(1, 8, 3, [0, 1, 3], [], True),
        SeqStep(2, 4, 4, [0, 4], [], True),
    ]
    assert a.block_table[:2] == b.block_table[:2] == [0, 1]
    assert sched.block_manager.ref_counts[:2] == [3, 2]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (8, 4)
    assert outputs_of(outs, "b") == [RequestOutput("b", [7], num_cached_tokens=8)]
    assert outputs_of(outs, "a") == [RequestOutput("a", [7])]


def test_no_prefix_sharing_before_kv_exists():
    sched = make(max_batched_tokens=32)
    prompt = list(range(100, 110))
    sched.add(submit("a", prompt))
    sched.add(submit("b", prompt))
    plan = sched.schedule()  # same step: a's blocks are not computed yet
    assert [s.new_block_ids for s in plan.seqs] == [[0, 1, 2], [3, 4, 5]]


def test_add_errors():
    sched = make(num_blocks=4, session_len=32)
    cases = {
        "empty": ([], "empty"),
        "long": (list(range(32)), "session length is 32"),
        "big": (list(range(17)), "needs 5 KV blocks; the cache has only 4"),
    }
    for rid, (tokens, msg) in cases.items():
        out = sched.add(submit(rid, tokens))
        assert out.request_id == rid and out.finish_reason == ERROR and msg in out.error
        assert out.rejected, "a request that can never run is the client's error (a 400)"
    assert sched.add(submit("ok", [1])) is None
    assert "already in use" in sched.add(submit("ok", [1])).error
    assert "max_tokens" in sched.add(submit("zero", [1], max_tokens=0)).error
    assert sched.num_waiting == 1


def test_fail_all_ends_everything():
    sched = make(max_batch_size=1)
    sched.add(submit("a", [1, 3], fid="f1"))
    sched.add(submit("b", [1, 4], fid="f2"))
    sched.schedule()
    outs = sched.fail_all("worker 0 died")
    assert outs == {
        "f1": [RequestOutput("a", [], finish_reason=ERROR, error="worker 0 died")],
        "f2": [RequestOutput("b", [], finish_reason=ERROR, error="worker 0 died")],
    }
    assert not sched.has_unfinished and sched.num_free_blocks == 16


def test_seeds_drawn_when_not_given():
    s1, s2 = make(), make()
    for s in (s1, s2):
        s.add(Submit("a", "fe", [1], SamplingParams()))
        s.add(Submit("b", "fe", [1], SamplingParams(seed=5)))
    seeds = [n.seed for n in s1.schedule().new_seqs]
    assert seeds == [n.seed for n in s2.schedule().new_seqs]
    assert seeds[1] == 5


def test_result_for_another_step_is_rejected():
    sched = make()
    sched.add(submit("a", [1]))
    plan = sched.schedule()
    with pytest.raises(ValueError, match="step"):
        sched.update(StepResult(plan.step_id + 1, [0], [7]))


def test_a_sequence_the_workers_failed_ends_alone_and_caches_nothing():
    """A worker could not take one sequence's input (its image): that request ends with a
    rejection (a 400), its blocks are free and none of them enters the prefix cache; the others
    of the step get their tokens."""
    sched = make(num_blocks=8)
    prompt = list(range(10, 18))  # two full blocks
    sched.add(submit("bad", prompt))
    sched.add(submit("good", [1, 3]))
    plan = sched.schedule()
    bad_seq = next(n.seq_id for n in plan.new_seqs if n.token_ids == prompt)
    ok = result(plan)
    outs = sched.update(
        StepResult(plan.step_id, [i for i in ok.seq_ids if i != bad_seq],
                   [t for i, t in zip(ok.seq_ids, ok.token_ids, strict=True) if i != bad_seq],
                   failed={bad_seq: "cannot encode"})
    )  # fmt: skip
    [failed] = outputs_of(outs, "bad")
    assert (failed.finish_reason, failed.error, failed.rejected) == (ERROR, "cannot encode", True)
    assert outputs_of(outs, "good") == [RequestOutput("good", [7])]
    assert sched.num_running == 1 and sched.num_free_blocks == 7
    sched.add(submit("again", prompt))
    plan = sched.schedule()
    assert plan.freed_seq_ids == [bad_seq]
    [again] = [n for n in plan.new_seqs if n.token_ids == prompt]
    step_of = {s.seq_id: s for s in plan.seqs}
    assert step_of[again.seq_id].start == 0, "the failed prefill's blocks must not be reused"
