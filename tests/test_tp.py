"""Tensor parallelism on CPU (gloo): the split of heads, the rendezvous, and real engines.

Greedy output at --tp 2 must be token-identical to --tp 1 and to transformers, with head
counts that divide by the ranks and with ones that don't (KV heads replicated, query and
KV heads split unevenly), several requests in flight. A rank killed mid-generation fails
the requests within seconds and every process of the engine exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time

import msgspec
import pytest
import torch.distributed as dist
from hf_reference import compare_greedy, hf_greedy

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import Finished, run_requests
from vlmserve.frontend.scheduler_client import SchedulerClient, SchedulerUnavailable
from vlmserve.shared.config import Config
from vlmserve.shared.messages import ERROR, SamplingParams
from vlmserve.workers.parallel import Rendezvous, shard_heads

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
PROMPT_LENS = [4, 11, 29, 57]
# A step budget below the longest prompt: prefill chunks and decodes share steps.
ENGINE = dict(device="cpu", max_batched_tokens=40, max_batch_size=8, num_kv_blocks=64)

# Shapes on top of the tiny size (4 heads, 2 KV heads, hidden 64); at --tp 2:
SHAPES = {
    "even": {},  # 2 query heads and 1 KV head per rank
    "kv1": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1),  # q 2+1, kv 1
    "kv3": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3),  # q 4+2, kv 2+1
}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory):
    """Builds (once) the checkpoint of an architecture and a shape from SHAPES."""
    from vlmserve.workers.demo_checkpoint import build_checkpoint

    root = tmp_path_factory.mktemp("tp-checkpoints")
    built: dict[tuple[str, str], str] = {}

    def get(arch: str, shape: str) -> str:
        if (arch, shape) not in built:
            built[arch, shape] = build_checkpoint(
                str(root / f"{arch}-{shape}"), arch=arch, **SHAPES[shape]
            )
        return built[arch, shape]

    return get


def prompts_for(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]


def generate(model_dir: str, workdir: str, tp: int, prompts: list[list[int]]) -> list[Finished]:
    with scheduler_and_workers(model_dir, workdir, tp=tp, **ENGINE) as eng:
        results, _ = run_requests(eng["config"], [(p, GREEDY) for p in prompts], timeout=60)
    for i, res in enumerate(results):
        assert res.error is None, f"tp {tp} request {i}: {res.error}"
    return results


def assert_matches(label: str, results: list[Finished], refs: list) -> list[bool]:
    """compare_greedy for each request; True where it matched transformers to the end."""
    return [
        compare_greedy(f"{label} request {i}", res.token_ids, ref_tokens, ref_logits)
        for i, (res, (ref_tokens, ref_logits)) in enumerate(zip(results, refs, strict=True))
    ]


# ---- head splits ----


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6, 8])
def test_every_head_on_one_rank_with_its_kv_head(size: int) -> None:
    for num_kv_heads in range(1, 9):
        for group in range(1, 7):
            num_heads = num_kv_heads * group
            if num_heads < size:
                with pytest.raises(ValueError, match="at least one"):
                    shard_heads(num_heads, num_kv_heads, size, 0)
                continue
            owners = []
            for rank in range(size):
                s = shard_heads(num_heads, num_kv_heads, size, rank)
                assert s.num_heads >= 1 and s.num_kv_heads >= 1
                assert s.num_heads % s.num_kv_heads == 0, "local attention must be GQA"
                local_group = s.num_heads // s.num_kv_heads
                for i in range(s.num_heads):
                    head = s.q_start + i
                    # The rank's i-th query head reads its (i // local_group)-th KV head,
                    # which must be the one the head reads in the whole model.
                    assert s.kv_start + i // local_group == head // group, (num_heads, rank)
                    owners.append(head)
            assert sorted(owners) == list(range(num_heads)), (num_heads, num_kv_heads, size)


def test_uneven_split_sizes() -> None:
    assert [shard_heads(6, 1, 4, r).num_heads for r in range(4)] == [2, 2, 1, 1]
    assert [shard_heads(6, 3, 2, r).num_kv_heads for r in range(2)] == [2, 1]
    assert [shard_heads(8, 2, 4, r).kv_start for r in range(4)] == [0, 0, 1, 1]


# ---- rendezvous ----


def _meet(configs: list[Config], first: int) -> tuple[list[Rendezvous | None], list]:
    """Every config's Rendezvous + join, in threads, rank `first` started first."""
    out: list[Rendezvous | None] = [None] * len(configs)
    errors: list = [None] * len(configs)

    def run(i: int) -> None:
        try:
            deadline = time.monotonic() + configs[i].dist_timeout
            out[i] = Rendezvous(configs[i], deadline)
            out[i].join(deadline)
        except Exception as exc:
            errors[i] = exc
            if out[i] is not None:
                out[i].close()

    order = [first] + [i for i in range(len(configs)) if i != first]
    threads = [threading.Thread(target=run, args=(i,)) for i in order]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(30)
    return out, errors


def test_stale_rendezvous_file_of_the_same_run_id_is_ignored(tmp_path) -> None:
    base = Config(run_id="again", ipc_dir=str(tmp_path), tp=2, dist_timeout=10)
    # A killed run left a pointer (unlocked: its rank 0 is gone) to a store in which both
    # ranks had joined; a rank that trusted it would "meet" nobody.
    pointer = tmp_path / "vlmserve-again-tp"
    stale = str(pointer) + ".dead"
    store = dist.FileStore(stale, 2)
    store.set("vlmserve/joined/0", "1")
    store.set("vlmserve/joined/1", "1")
    pointer.write_text(stale)
    configs = [msgspec.structs.replace(base, rank=r) for r in range(2)]
    met, errors = _meet(configs, first=1)  # rank 1 first finds only the stale pointer
    assert errors == [None, None]
    assert met[0].store_path == met[1].store_path != stale
    assert not os.path.exists(stale), "rank 0 removes the store files of earlier runs"
    for r in reversed(met):
        r.close()
    assert not pointer.exists()


def test_missing_rank_fails_clearly(tmp_path) -> None:
    config = Config(run_id="alone", ipc_dir=str(tmp_path), tp=3, dist_timeout=0.5)
    _, errors = _meet([config], first=0)
    assert isinstance(errors[0], TimeoutError)
    assert "rank(s) [1, 2] of 3 did not join" in str(errors[0])
    lonely = msgspec.structs.replace(config, rank=1)
    _, errors = _meet([lonely], first=0)
    assert "rank 0 did not open the rendezvous" in str(errors[0])


def test_tcp_rendezvous(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = Config(tp=2, master_addr="127.0.0.1", master_port=port, dist_timeout=10)
    configs = [msgspec.structs.replace(base, rank=r) for r in range(2)]
    met, errors = _meet(configs, first=1)  # the client waits for rank 0's store
    assert errors == [None, None]
    assert met[0].where == f"tcp://127.0.0.1:{port}"


def test_multinode_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="--master-addr"):
        Config(tp=4, nnodes=2, engine_port=24000)
    with pytest.raises(ValueError, match="divide --tp"):
        Config(tp=3, nnodes=2, master_addr="10.0.0.1", master_port=29500, engine_port=24000)
    Config(tp=4, nnodes=2, node_rank=1, rank=3, master_addr="h", master_port=1, engine_port=2)


# ---- engines against transformers ----


def test_tp2_equals_tp1_and_transformers(build, workdir: str) -> None:
    model_dir = build("llama", "even")
    prompts = prompts_for(seed=1)
    refs = hf_greedy(model_dir, prompts, MAX_NEW)
    one = generate(model_dir, workdir, 1, prompts)
    two = generate(model_dir, workdir, 2, prompts)
    full_one = assert_matches("tp 1", one, refs)
    full_two = assert_matches("tp 2", two, refs)
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        if full_one[i] and full_two[i]:  # else one stopped at an accepted near-tie
            assert a.token_ids == b.token_ids, f"request {i}: tp 1 {a.token_ids}, tp 2 {b}"
    assert any(full_two), "every request stopped at a near-tie: the test shows nothing"


@pytest.mark.parametrize(("arch", "shape"), [("qwen2", "kv1"), ("llama", "kv3")])
def test_uneven_heads_tp2_match_transformers(build, workdir: str, arch: str, shape: str) -> None:
    model_dir = build(arch, shape)
    prompts = prompts_for(seed=2)
    refs = hf_greedy(model_dir, prompts, MAX_NEW)
    assert any(
        assert_matches(f"{arch}/{shape} tp 2", generate(model_dir, workdir, 2, prompts), refs)
    )


# ---- a rank dies ----


async def _generate_and_kill(
    config: Config, prompts: list[list[int]], victim, after_tokens: int
) -> tuple[list[Finished], list[float], float]:
    """Run the prompts; SIGKILL `victim` once some request has `after_tokens` tokens."""
    client = SchedulerClient(config)
    await client.start(60)
    killed_at: list[float] = []
    finished_at: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not client.alive:
            assert time.monotonic() < deadline, "engine did not come up"
            await asyncio.sleep(0.05)

        async def one(i: int, prompt: list[int]) -> Finished:
            out = Finished()
            sp = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
            try:
                async for output in client.generate(f"r{i}", prompt, sp):
                    out.token_ids.extend(output.token_ids)
                    out.finish_reason, out.error = output.finish_reason, output.error
                    if not killed_at and len(out.token_ids) >= after_tokens:
                        victim.kill()
                        killed_at.append(time.monotonic())
            except SchedulerUnavailable as exc:  # the scheduler itself is gone
                out.finish_reason, out.error = ERROR, str(exc)
            finished_at.append(time.monotonic())
            return out

        jobs = [one(i, p) for i, p in enumerate(prompts)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 60)
    finally:
        await client.close()
    assert killed_at, "the requests ended before the kill"
    return list(results), finished_at, killed_at[0]


def test_rank_death_fails_requests_and_every_process_exits(build, workdir: str) -> None:
    settings = {**ENGINE, "num_kv_blocks": 512, "worker_timeout": 2.0}
    with scheduler_and_workers(build("llama", "even"), workdir, tp=2, **settings) as eng:
        procs = eng["procs"]
        results, finished_at, killed_at = asyncio.run(
            _generate_and_kill(eng["config"], prompts_for(seed=3), procs["worker1"], 8)
        )
        exits = {}
        for name in ("scheduler", "worker0"):
            with contextlib.suppress(Exception):
                procs[name].wait(timeout=max(0.1, killed_at + 10 - time.monotonic()))
            exits[name] = procs[name].returncode
    for i, res in enumerate(results):
        assert res.finish_reason == ERROR, f"request {i}: finish {res.finish_reason}"
        assert "worker rank" in (res.error or ""), res.error
    assert max(finished_at) - killed_at < 10, "requests not failed within 10 s of the kill"
    assert any(len(res.token_ids) >= 8 for res in results), "killed before generation"
    for name, code in exits.items():
        assert code is not None, f"{name} still running 10 s after rank 1 died"
    assert exits["scheduler"] != 0, "the scheduler must exit non-zero (supervisor restarts)"


def test_scheduler_death_ends_every_rank(build, workdir: str) -> None:
    """Ranks whose scheduler is gone exit by themselves, even from inside a collective."""
    settings = {**ENGINE, "num_kv_blocks": 512, "worker_timeout": 2.0}
    with scheduler_and_workers(build("llama", "kv3"), workdir, tp=2, **settings) as eng:
        procs = eng["procs"]
        _, _, killed_at = asyncio.run(
            _generate_and_kill(eng["config"], prompts_for(seed=4), procs["scheduler"], 8)
        )
        for name in ("worker0", "worker1"):
            with contextlib.suppress(Exception):
                procs[name].wait(timeout=max(0.1, killed_at + 8 - time.monotonic()))
            assert procs[name].returncode is not None, f"{name} outlived its scheduler by 8 s"
            assert procs[name].returncode != 0, f"{name} exited 0 without being told to"


def test_llava_tp2_matches_transformers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A vision-language model at --tp 2 through the real server: each rank runs the vision
    tower for the step's new images (no rank holds more than another), the decoder is
    sharded, and the answer is transformers' greedy one for the same processor and template."""
    import openai
    from PIL import Image
    from server_fixtures import free_port
    from vlm_reference import VLMReference, data_url

    from vlmserve.deploy.launcher import server
    from vlmserve.shared.config import new_run_id
    from vlmserve.workers.demo_vlm import build_llava

    root = tmp_path_factory.mktemp("llava-tp")
    model_dir = build_llava(str(root / "ckpt"), next_=True)
    image = Image.new("RGB", (50, 30), (200, 40, 90))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "what is this"},
    ]}]  # fmt: skip
    ref = VLMReference(model_dir)
    prompt_len, tokens = ref.greedy(messages, [image], 12)
    expected = ref.text(tokens)
    del ref
    config = Config(
        model=model_dir, run_id=new_run_id(), ipc_dir=str(root), server_name="127.0.0.1",
        server_port=free_port(), tp=2, log_level="WARNING",
    )  # fmt: skip
    with server(config, str(root / "server.log")) as srv:
        client = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="ckpt", messages=messages, max_tokens=12, temperature=0
        )
    assert reply.usage.prompt_tokens == prompt_len
    assert reply.choices[0].message.content == expected, f"transformers' tokens: {tokens}"
