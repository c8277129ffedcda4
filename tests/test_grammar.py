"""Constrained decoding on the workers (workers/grammar.py): the mask against xgrammar's own
matcher, replay after preemption, padded vocabularies, the batched apply, and the engine against
a transformers greedy loop under the same mask."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
import xgrammar
from hf_reference import compare_greedy

from vlmserve.deploy.launcher import scheduler_and_workers
from vlmserve.frontend.offline import run_requests
from vlmserve.shared.grammars import GrammarError, to_xgrammar
from vlmserve.shared.messages import Grammar, SamplingParams
from vlmserve.shared.models import read_model_info
from vlmserve.workers.grammar import GrammarBackend, GrammarMask
from vlmserve.workers.logits_processors import ProcessorRow, apply_processors

VOCAB = 512  # the tiny checkpoints' vocabulary
NEG_INF = float("-inf")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "tags", "n"],
}
JSON_SCHEMA = Grammar("json_schema", json.dumps(SCHEMA))
ANYTHING = Grammar("regex", r"[\s\S]*")


@pytest.fixture(scope="module")
def model_dir(checkpoints: dict) -> str:
    return checkpoints["llama"]


@pytest.fixture(scope="module")
def backend(model_dir: str) -> GrammarBackend:
    made = GrammarBackend(model_dir, VOCAB, read_model_info(model_dir).eos_token_ids)
    made.wait_ready()
    return made


def mask(processor: GrammarMask, token_ids: list[int], prompt_len: int, width: int = VOCAB):
    logits = torch.zeros(width)
    processor(logits, token_ids, prompt_len)
    return logits


def allowed(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(logits != NEG_INF).flatten().tolist()


def test_bad_specs_are_grammar_errors_naming_the_problem() -> None:
    for grammar, words in [
        (Grammar("json_schema", '{"type": "foo"}'), "foo"),
        (Grammar("json_schema", "{not json"), "JSON"),
        (Grammar("regex", "(ab"), "parenthesis"),
        (Grammar("ebnf", 'root ::= "a" | b'), '"b"'),
        (Grammar("choice", "[]"), "non-empty"),
    ]:
        with pytest.raises(GrammarError, match=words) as err:
            to_xgrammar(grammar)
        assert "/project/" not in str(err.value), "no C++ source positions for the client"


def test_the_mask_is_xgrammars_own_and_replays_to_the_same_state(
    backend: GrammarBackend, model_dir: str
) -> None:
    """Follow random logits under the mask; at every step a mask made anew from the tokens so
    far (a sequence resumed after preemption) allows the same tokens as the one that went
    along, and both equal a matcher of xgrammar's compiled here from the schema directly."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[2])
    compiled = xgrammar.GrammarCompiler(info).compile_grammar(to_xgrammar(JSON_SCHEMA))
    reference = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)
    before = backend.compilations
    along = backend.processor_for(SamplingParams(grammar=JSON_SCHEMA))
    prompt = [5, 6, 7]
    tokens = list(prompt)
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        logits = mask(along, tokens, len(prompt))
        resumed = backend.processor_for(SamplingParams(grammar=JSON_SCHEMA))
        assert torch.equal(mask(resumed, tokens, len(prompt)), logits), tokens
        reference.fill_next_token_bitmask(bitmask)
        expected = torch.zeros(1, VOCAB)
        xgrammar.apply_token_bitmask_inplace(expected, bitmask)
        assert torch.equal(expected[0], logits)
        token = int((logits + torch.rand(VOCAB, generator=gen)).argmax())
        tokens.append(token)
        if token == 2:
            break
        assert reference.accept_token(token)
    assert tokens[-1] == 2, "the grammar completed and the only choice left was eos"
    text = tokenizer.decode(tokens[len(prompt) : -1])
    assert set(json.loads(text)) == {"name", "tags", "n"}, text
    assert backend.compilations - before <= 1, "one schema is compiled once"


def test_bounded_json_strings_take_no_raw_control_characters(
    backend: GrammarBackend, model_dir: str
) -> None:
    """xgrammar's own grammar for a string with maxLength lets U+0000-U+001F in (JSON no
    parser accepts); ours takes exactly those tokens out and nothing else."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[2])
    theirs = xgrammar.GrammarMatcher(
        xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    )
    opened = tokenizer.encode('{"name": "', add_special_tokens=False)
    for token in opened:
        assert theirs.accept_token(token)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)
    theirs.fill_next_token_bitmask(bitmask)
    their_logits = torch.zeros(1, VOCAB)
    xgrammar.apply_token_bitmask_inplace(their_logits, bitmask)
    ours = allowed(mask(backend.processor_for(SamplingParams(grammar=JSON_SCHEMA)), opened, 0))
    control = {
        t for t in allowed(their_logits[0]) if any(ord(c) < 32 for c in tokenizer.decode([t]))
    }
    assert control, "the tiny vocabulary has control-character tokens"
    assert set(ours) == set(allowed(their_logits[0])) - control


def test_a_completed_grammar_allows_only_the_stop_tokens(
    backend: GrammarBackend, model_dir: str
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    choice = Grammar("choice", json.dumps(["yes", "no way", "日本"]))
    params = SamplingParams(grammar=choice, stop_token_ids=[7])
    for text in ["yes", "no way", "日本"]:
        processor = backend.processor_for(params)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert allowed(mask(processor, [1, *ids], 1)) == [2, 7], text  # eos and the stop id
        assert allowed(mask(processor, [1, *ids, 2], 1)) == [2, 7], "after eos (ignore_eos)"
    # A token the grammar cannot take (a bug upstream) leaves only the stop tokens too.
    processor = backend.processor_for(params)
    refused = [1, *tokenizer.encode("x", add_special_tokens=False)]
    assert allowed(mask(processor, refused, 1)) == [2, 7]


def test_padded_vocabulary_rows_are_never_allowed(model_dir: str) -> None:
    padded = GrammarBackend(model_dir, VOCAB + 40, [2])  # the model's logits are wider
    processor = padded.processor_for(SamplingParams(grammar=ANYTHING))
    logits = mask(processor, [1], 1, width=VOCAB + 40)
    assert (logits[VOCAB:] == NEG_INF).all()
    assert 2 in allowed(logits) and len(allowed(logits)) > 300


def test_rows_of_a_batch_are_masked_together_like_one_by_one(
    backend: GrammarBackend, model_dir: str
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    choice = Grammar("choice", '["cat", "dog"]')
    rows_of = [
        (JSON_SCHEMA, '{"name": "a'),
        (None, ""),
        (choice, "c"),
        (JSON_SCHEMA, ""),
        (ANYTHING, "hi"),
    ]
    rows, one_by_one = [], logits.clone()
    for row, (grammar, text) in enumerate(rows_of):
        if grammar is None:
            continue
        tokens = [1, *tokenizer.encode(text, add_special_tokens=False)]
        params = SamplingParams(grammar=grammar)
        rows.append(ProcessorRow(row, backend.processor_for(params), tokens, 1))
        backend.processor_for(params)(one_by_one[row], tokens, 1)
    together = apply_processors(logits, rows)
    assert torch.equal(together, one_by_one)
    assert torch.equal(together[1], logits[1]), "a row without a grammar is untouched"


# ---- the engine --------------------------------------------------------------------------------

MAX_NEW = 80


@pytest.fixture(scope="module")
def engine(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    workdir = str(tmp_path_factory.mktemp("grammar"))
    # 24 blocks of 16 tokens cannot hold every request at once: some get preempted and resume.
    with scheduler_and_workers(model_dir, workdir, block_size=16, num_kv_blocks=24) as eng:
        yield eng


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(20, 150))] for _ in range(count)
    ]


def test_a_mask_that_allows_everything_changes_no_token(
    engine: dict, backend: GrammarBackend
) -> None:
    """`[\\s\\S]*` allows any text: every token that is whole UTF-8 characters, and eos. Both
    runs get a bias against the others (pieces of characters, <unk>, <s>): then neither meets
    the mask, and greedy and seeded sampled answers must be token-identical."""

    def banned_after(tokens: list[int]) -> set[int]:
        processor = backend.processor_for(SamplingParams(grammar=ANYTHING))
        return set(range(VOCAB)) - set(allowed(mask(processor, [1, *tokens], 1)))

    at_start = banned_after([])
    # A token that starts a character without ending it changes what may follow (ids 0-2 are
    # <unk>, <s> and eos, after which only eos may follow).
    pieces = {t for t in range(3, VOCAB) if t not in at_start and banned_after([t]) != at_start}
    banned = at_start | pieces
    assert 2 not in banned and 0 < len(banned) < VOCAB // 2
    bias = {t: -100.0 for t in banned}
    asks = [
        SamplingParams(max_tokens=40, temperature=t, seed=s, logit_bias=bias)
        for t, s in [(0.0, None), (1.0, 1), (0.8, 2), (1.0, 3)]
    ]
    ps = prompts(len(asks), seed=1)
    plain = [(p, sp) for p, sp in zip(ps, asks, strict=True)]
    masked = [(p, msgspec_replace(sp, grammar=ANYTHING)) for p, sp in plain]
    results, _ = run_requests(engine["config"], plain + masked)
    for i, (free, constrained) in enumerate(zip(results[:4], results[4:], strict=True)):
        assert free.error is None and constrained.error is None
        assert constrained.token_ids == free.token_ids, f"request {i}"


def msgspec_replace(params: SamplingParams, **changes: object) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(params, **changes)


def hf_constrained(
    model_dir: str, prompt_ids: list[list[int]], schema: dict, max_new: int
) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy loop, one `model(...)` call per token, under a mask from an xgrammar
    matcher compiled here: for each prompt, the tokens and the masked logits of each step."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    eos = read_model_info(model_dir).eos_token_ids
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=eos)
    grammar = to_xgrammar(Grammar("json_schema", json.dumps(schema)))
    compiled = xgrammar.GrammarCompiler(info).compile_grammar(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)
    out = []
    for prompt in prompt_ids:
        matcher = xgrammar.GrammarMatcher(compiled)
        tokens: list[int] = []
        scores = []
        ids, cache = torch.tensor([prompt]), None
        with torch.no_grad():
            for _ in range(max_new):
                step = model(input_ids=ids, cache=cache, use_cache=True)
                cache = step.cache
                logits = step.logits[:, -1].float()  # [1, vocab]
                matcher.fill_next_token_bitmask(bitmask)
                xgrammar.apply_token_bitmask_inplace(logits, bitmask)
                token = int(logits.argmax())
                tokens.append(token)
                scores.append(logits[0])
                if token in eos:
                    break
                assert matcher.accept_token(token)
                ids = torch.tensor([[token]])
        out.append((tokens, torch.stack(scores)))
    return out


def test_engine_follows_a_schema_like_transformers_under_the_same_mask_through_preemption(
    engine: dict, model_dir: str
) -> None:
    ps = prompts(6, seed=2)
    refs = hf_constrained(model_dir, ps, SCHEMA, MAX_NEW)
    requests = [
        (p, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, grammar=JSON_SCHEMA)) for p in ps
    ]
    results, status = run_requests(engine["config"], requests)
    assert status.preemptions > 0, "the small cache was meant to force preemption"
    stopped = 0
    for i, (res, (ref_tokens, ref_scores)) in enumerate(zip(results, refs, strict=True)):
        assert res.error is None, res.error
        compare_greedy(f"request {i}", res.token_ids, ref_tokens, ref_scores)
        stopped += res.finish_reason == "stop"
    assert stopped >= 4, "most answers complete the JSON and stop"
