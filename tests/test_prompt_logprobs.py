"""Prompt logprobs against transformers: vLLM's `prompt_logprobs` and `echo` with `logprobs`.

Each prompt token's logprob must equal `log_softmax(model(input_ids).logits)` at the position
before it, gathered at the token, with its rank and the top N at that position: from the
engine, with chunked prefill (a step budget smaller than the prompts) and with the prompt's
prefix already cached; and through the server, in vLLM's and OpenAI's shapes, read by the
`openai` client. One server (tiny Llama, 32-token steps) serves the module.
"""

from __future__ import annotations

import random

import openai
import pytest
import torch
import transformers
from server_fixtures import ChatReference, local_config

from vlmserve.deploy.launcher import scheduler_and_workers, server
from vlmserve.frontend.detokenizer import TokenTexts
from vlmserve.frontend.offline import Finished, run_requests
from vlmserve.shared.messages import PromptLogprobs, SamplingParams

TOLERANCE = 1e-4


def random_prompt(length: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 512) for _ in range(length)]


def hf_prompt_logprobs(model: transformers.PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is the distribution that prompt token i + 1 came from."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()  # [len, vocab]
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_matches(label: str, got: PromptLogprobs, prompt: list[int], ref: torch.Tensor) -> None:
    """Compare every position; report the first that differs."""
    assert len(got.logprobs) == len(prompt) - 1, f"{label}: {len(got.logprobs)} positions"
    targets = torch.tensor(prompt[1:])
    ref_chosen = ref.gather(1, targets.unsqueeze(1)).squeeze(1)
    ref_ranks = (ref >= ref_chosen.unsqueeze(1)).sum(dim=-1)
    for pos in range(len(prompt) - 1):
        where = f"{label}: first difference at prompt token {pos + 1}"
        diff = abs(got.logprobs[pos] - ref_chosen[pos].item())
        assert diff < TOLERANCE, f"{where}: logprob {got.logprobs[pos]} vs {ref_chosen[pos]}"
        # A rank may differ only where another token is within the tolerance of this one.
        near = ((ref[pos] - ref_chosen[pos]).abs() < TOLERANCE).sum().item()
        assert abs(got.ranks[pos] - ref_ranks[pos].item()) < near, (
            f"{where}: rank {got.ranks[pos]} vs {ref_ranks[pos].item()}"
        )
        n = len(got.top_ids[pos])
        values, ids = ref[pos].topk(n)
        torch.testing.assert_close(
            torch.tensor(got.top_logprobs[pos]), values, atol=TOLERANCE, rtol=0, msg=where
        )
        gaps = torch.cat([values[:-1] - values[1:], torch.tensor([1.0])]) if n else values
        for k in range(n):  # the order of near-ties may differ
            if gaps[k] > TOLERANCE and (k == 0 or gaps[k - 1] > TOLERANCE):
                assert got.top_ids[pos][k] == ids[k].item(), f"{where}: top {k} id"


def run(config: object, requests: list[tuple[list[int], SamplingParams]]) -> list[Finished]:
    results, _ = run_requests(config, requests)
    for res in results:
        assert res.error is None, res.error
    return results


@pytest.fixture(scope="module")
def srv(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("prompt-logprobs")
    # A 32-token step budget cuts longer prompts into chunks.
    config = local_config(
        checkpoints["llama"], workdir, block_size=16, max_batched_tokens=32, max_batch_size=16,
        num_kv_blocks=256, session_len=256,
    )  # fmt: skip
    with server(config, str(workdir / "server.log")) as running:
        yield running


@pytest.fixture(scope="module")
def model(checkpoints: dict) -> transformers.PreTrainedModel:
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], dtype=torch.float32
    )
    return loaded.eval()


@pytest.fixture(scope="module")
def client(srv: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv["url"] + "/v1", api_key="none", max_retries=0)


def test_prompt_logprobs_match_transformers_chunked_and_after_a_cached_prefix(
    srv: dict, model: transformers.PreTrainedModel
) -> None:
    rng = random.Random(11)
    prompts = [random_prompt(n, rng) for n in (1, 2, 17, 40, 90)]
    asks = [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=n) for n in (5, 0, 3)]
    # The five prompts' chunks run side by side, beside a request that asks for nothing.
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    requests = [(p, asks[i % 3]) for i, p in enumerate(prompts)] + [(prompts[3], plain)]
    results = run(srv["config"], requests)
    # Then the 90-token prompt again, now cached: a request that asks for prompt logprobs
    # does not take the cached blocks (they have no logits), others still do.
    again = run(srv["config"], [(prompts[4], plain)])[0]
    cached = run(srv["config"], [(prompts[4], asks[0])])[0]
    assert results[-1].prompt_logprobs is None, "a request that did not ask got them"
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=False)):
        assert res.prompt_logprobs is not None, f"prompt {i} got no prompt logprobs"
        num_top = asks[i % 3].prompt_logprobs
        assert all(len(ids) == num_top for ids in res.prompt_logprobs.top_ids)
        assert_matches(f"prompt {i} ({len(prompt)} tokens)", res.prompt_logprobs, prompt,
                       hf_prompt_logprobs(model, prompt))  # fmt: skip
    assert again.num_cached_tokens >= 80, "the second run of the prompt was meant to hit the cache"
    assert cached.num_cached_tokens == 0
    assert cached.token_ids == results[4].token_ids
    assert cached.prompt_logprobs is not None
    assert_matches("cached prompt", cached.prompt_logprobs, prompts[4],
                   hf_prompt_logprobs(model, prompts[4]))  # fmt: skip


def test_completions_echo_with_logprobs_streamed_and_not(
    client: openai.OpenAI, srv: dict, model: transformers.PreTrainedModel, checkpoints: dict
) -> None:
    prompt = random_prompt(40, random.Random(12))
    asked = dict(model=srv["config"].served_name, prompt=prompt, max_tokens=4, temperature=0)
    plain = client.completions.create(**asked, logprobs=2)
    echoed = client.completions.create(**asked, logprobs=2, echo=True, n=2)
    texts = TokenTexts(transformers.AutoTokenizer.from_pretrained(checkpoints["llama"]))
    ref = hf_prompt_logprobs(model, prompt)
    for choice in echoed.choices:
        lps = choice.logprobs
        assert lps.tokens[: len(prompt)] == [texts.text_of(t) for t in prompt]
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        want = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(
            torch.tensor(lps.token_logprobs[1 : len(prompt)]), want, atol=TOLERANCE, rtol=0
        )
        for pos, top in enumerate(lps.top_logprobs[1 : len(prompt)]):
            torch.testing.assert_close(
                torch.tensor(sorted(top.values(), reverse=True)), ref[pos].topk(2).values,
                atol=TOLERANCE, rtol=0, msg=f"top logprobs of prompt token {pos + 1}",
            )  # fmt: skip
        offsets = [0]
        for token in lps.tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        assert lps.text_offset == offsets
        # After the echoed prompt: the completion's own logprobs, as without echo.
        assert lps.tokens[len(prompt) :] == plain.choices[0].logprobs.tokens
        torch.testing.assert_close(  # (the plain request computed its prompt in other batches)
            torch.tensor(lps.token_logprobs[len(prompt) :]),
            torch.tensor(plain.choices[0].logprobs.token_logprobs),
            atol=TOLERANCE, rtol=0,
        )  # fmt: skip
        assert choice.text.endswith(plain.choices[0].text)
    assert echoed.usage.prompt_tokens == len(prompt)

    streamed: dict[int, dict[str, list]] = {}
    for chunk in client.completions.create(**asked, logprobs=2, echo=True, n=2, stream=True):
        for choice in chunk.choices:
            joined = streamed.setdefault(choice.index, {"text": [], "lists": []})
            joined["text"].append(choice.text)
            if choice.logprobs is not None:
                joined["lists"].append(choice.logprobs)
    for index, choice in enumerate(echoed.choices):
        joined = streamed[index]
        assert "".join(joined["text"]) == choice.text
        parts = {
            name: [v for lps in joined["lists"] for v in getattr(lps, name)]
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }
        for name in ("tokens", "text_offset"):
            assert parts[name] == getattr(choice.logprobs, name), f"choice {index}: {name}"
        # Values equal up to float noise: the streamed request ran in other batches.
        want = choice.logprobs
        assert parts["token_logprobs"][0] is None and parts["top_logprobs"][0] is None
        torch.testing.assert_close(
            torch.tensor(parts["token_logprobs"][1:]), torch.tensor(want.token_logprobs[1:]),
            atol=TOLERANCE, rtol=0, msg=f"choice {index}: streamed token_logprobs",
        )  # fmt: skip
        pairs = zip(parts["top_logprobs"][1:], want.top_logprobs[1:], strict=True)
        for pos, (got, top) in enumerate(pairs):
            assert got.keys() == top.keys(), f"choice {index}: top logprobs at {pos + 1}"
            torch.testing.assert_close(
                torch.tensor([got[k] for k in top]), torch.tensor(list(top.values())),
                atol=TOLERANCE, rtol=0, msg=f"choice {index}: top logprobs at {pos + 1}",
            )  # fmt: skip


def vllm_entries(position: dict, prompt_token: int) -> list[tuple[int, dict]]:
    items = [(int(k), v) for k, v in position.items()]
    assert items[0][0] == prompt_token, "the prompt token's entry comes first, as in vLLM"
    return items


def assert_vllm_shape(
    label: str, got: list, prompt: list[int], ref: torch.Tensor, num_top: int
) -> None:
    """vLLM's `prompt_logprobs`: None, then per token its entry and the top `num_top`."""
    assert len(got) == len(prompt) and got[0] is None, f"{label}: {len(got)} entries"
    for pos, (token, position) in enumerate(zip(prompt[1:], got[1:], strict=True)):
        items = vllm_entries(position, token)
        entry = items[0][1]
        assert abs(entry["logprob"] - ref[pos, token].item()) < TOLERANCE, f"{label} {pos + 1}"
        assert entry["rank"] == (ref[pos] >= ref[pos, token]).sum().item(), f"{label} {pos + 1}"
        assert isinstance(entry["decoded_token"], str)
        top = {i: v for i, v in items if i != token or v["rank"] <= num_top}
        assert len(top) == num_top, f"{label} {pos + 1}: {position}"
        values, _ = ref[pos].topk(num_top)
        got_values = sorted((v["logprob"] for v in top.values()), reverse=True)
        torch.testing.assert_close(torch.tensor(got_values), values, atol=TOLERANCE, rtol=0)
        assert sorted(v["rank"] for v in top.values()) == list(range(1, num_top + 1))


def test_prompt_logprobs_on_completions_and_chat_through_the_openai_client(
    client: openai.OpenAI, srv: dict, model: transformers.PreTrainedModel, checkpoints: dict
) -> None:
    name = srv["config"].served_name
    prompt = random_prompt(20, random.Random(13))
    out = client.completions.create(
        model=name, prompt=prompt, max_tokens=2, temperature=0, n=2,
        extra_body={"prompt_logprobs": 3},
    )  # fmt: skip
    ref = hf_prompt_logprobs(model, prompt)
    for choice in out.choices:  # every choice reports its prompt's
        assert_vllm_shape("completion", choice.prompt_logprobs, prompt, ref, 3)
    assert out.choices[0].logprobs is None

    messages = [{"role": "user", "content": "hello there, how are you?"}]
    chat = client.chat.completions.create(
        model=name, messages=messages, max_tokens=2, temperature=0,
        extra_body={"prompt_logprobs": 0},
    )  # fmt: skip
    chat_prompt = ChatReference(checkpoints["llama"]).prompt_ids(messages)
    assert chat.usage.prompt_tokens == len(chat_prompt)
    chat_ref = hf_prompt_logprobs(model, chat_prompt)
    assert_vllm_shape("chat", chat.prompt_logprobs, chat_prompt, chat_ref, 0)
    plain = client.chat.completions.create(
        model=name, messages=messages, max_tokens=2, temperature=0
    )
    assert "prompt_logprobs" not in plain.model_dump(exclude_unset=True)
    assert plain.choices[0].message.content == chat.choices[0].message.content

    # Not streamed, as in vLLM (0 is allowed and sends nothing).
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=2, stream=True,
            extra_body={"prompt_logprobs": 1},
        )  # fmt: skip
    assert refused.value.body["param"] == "prompt_logprobs"
    chunks = client.completions.create(
        model=name, prompt=prompt, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}
    )
    assert all("prompt_logprobs" not in c.model_dump(exclude_unset=True) for c in chunks)


def test_prompt_logprobs_through_preemption(
    checkpoints: dict, workdir: str, model: transformers.PreTrainedModel
) -> None:
    # 20 blocks of 16 tokens cannot hold six 60-token prompts and their 40 tokens each: the
    # newest are preempted, some before their first token (they score their prompt again),
    # some after it (they sent their prompt logprobs already).
    rng = random.Random(5)
    prompts = [random_prompt(60, rng) for _ in range(6)]
    asked = SamplingParams(max_tokens=40, temperature=0.0, prompt_logprobs=2, ignore_eos=True)
    settings = dict(max_batched_tokens=64, max_batch_size=8, num_kv_blocks=20)
    with scheduler_and_workers(checkpoints["llama"], workdir, **settings) as eng:
        results, status = run_requests(eng["config"], [(p, asked) for p in prompts])
    assert status is not None and status.preemptions > 0, "the small cache was meant to preempt"
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        assert res.error is None and len(res.token_ids) == 40, res.error
        assert res.prompt_logprobs is not None, f"prompt {i} got no prompt logprobs"
        assert_matches(f"preempted prompt {i}", res.prompt_logprobs, prompt,
                       hf_prompt_logprobs(model, prompt))  # fmt: skip
