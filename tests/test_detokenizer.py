"""Incremental detokenization and stop strings against real (tiny, built here) tokenizers.

Two tokenizers are trained offline in a few milliseconds: a GPT-2-style byte-level BPE,
and a Llama-style sentencepiece BPE (leading-space marker, byte fallback for characters
outside its vocabulary). Multi-byte characters are split over several tokens in both.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmserve.frontend.detokenizer import (
    IncrementalDetokenizer,
    StopChecker,
    TextStream,
    TokenTexts,
)

WORDS = ["hello", "world", "héllo", "wörld", "日本語", "🙂", "the", "cat", "naïve", "straße"]
# Characters the tokenizers rarely or never saw whole: each is several byte tokens.
RARE = ["é", "ö", "日", "本", "語", "🙂", "€", "ß", "中文", "👍🏽", "Ω"]
SPECIALS = ["<s>", "</s>", "<|im_end|>"]


def corpus(rng: random.Random, lines: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(lines)]


def random_text(rng: random.Random) -> str:
    pieces = rng.choices(WORDS + RARE + [" ", "  ", "\n", "x"], k=rng.randint(1, 10))
    return "".join(p if rng.random() < 0.5 else " " + p for p in pieces)


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
    )
    tok.train_from_iterator(corpus(random.Random(0), 300), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", additional_special_tokens=SPECIALS
    )


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # Llama's decoder: markers to spaces, byte tokens to bytes, drop the first leading space.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", *SPECIALS])
    ascii_lines = [
        line.encode("ascii", "ignore").decode() for line in corpus(random.Random(1), 300)
    ]
    tok.train_from_iterator(ascii_lines, trainer)
    # Byte fallback: every byte is a token "<0xNN>", used for characters not in the vocab.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS,
    )


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int], skip: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(
    detok: IncrementalDetokenizer, ids: list[int], rng: random.Random
) -> tuple[list[str], str]:
    """Feed `ids` in random chunks of 1-3 tokens; return the pieces and the finishing text."""
    pieces = []
    i = 0
    while i < len(ids):
        size = rng.randint(1, 3)
        pieces.append(detok.add(ids[i : i + size]))
        i += size
    return pieces, detok.finish()


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_stream_of_encoded_text_equals_decode(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(2)
    split_chars = 0
    for _ in range(150):
        text = random_text(rng)
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces, tail = stream(IncrementalDetokenizer(tokenizer, []), ids, rng)
        assert "".join(pieces) + tail == decode(tokenizer, ids)
        assert all("\ufffd" not in piece for piece in pieces), pieces
        split_chars += any("\ufffd" in decode(tokenizer, [i]) for i in ids)
    assert split_chars > 50  # the test did exercise characters split over tokens


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_of_random_ids(name: str, skip: bool, request: pytest.FixtureRequest) -> None:
    """Random ids (special tokens and stray bytes included) stream as they decode."""
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(3)
    vocab = len(tokenizer)
    checked = 0
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        full = decode(tokenizer, ids, skip)
        pieces, tail = stream(
            IncrementalDetokenizer(tokenizer, [], skip, spaces_between_special_tokens=False),
            ids,
            rng,
        )
        if "\ufffd" in full:
            continue  # not valid UTF-8 at the end: nothing to compare exactly
        checked += 1
        assert "".join(pieces) + tail == full
        assert all("\ufffd" not in piece for piece in pieces)
    assert checked > 30


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_prompt_context_keeps_leading_space(name: str, request: pytest.FixtureRequest) -> None:
    """New text is what decoding prompt + output adds to the prompt's own text."""
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(4)
    # Prompts that end in characters spelled by several byte tokens, so the context window
    # would start inside one; outputs that continue with more of them.
    prompts = ["the cat", "日本", "hello 🙂🙂", "straße 中文", "x"]
    outputs = [" world", "語 hello", "本語", " naïve cat", "\n👍🏽 Ω"]
    for prompt in prompts:
        for output in outputs:
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            ids = tokenizer.encode(prompt + output, add_special_tokens=False)
            assert ids[: len(prompt_ids)] == prompt_ids or name == "byte_level"
            if ids[: len(prompt_ids)] != prompt_ids:
                continue  # BPE merged across the boundary; not a prompt/output split
            new_ids = ids[len(prompt_ids) :]
            pieces, tail = stream(IncrementalDetokenizer(tokenizer, prompt_ids), new_ids, rng)
            expected = decode(tokenizer, ids)[len(decode(tokenizer, prompt_ids)) :]
            assert "".join(pieces) + tail == expected, (prompt, output)
            assert all("\ufffd" not in piece for piece in pieces)


def test_sentencepiece_first_output_token_keeps_its_space(sentencepiece) -> None:
    prompt_ids = sentencepiece.encode("the cat", add_special_tokens=False)
    word = sentencepiece.encode("hello world", add_special_tokens=False)
    assert sentencepiece.convert_ids_to_tokens(word[0]).startswith("▁")
    detok = IncrementalDetokenizer(sentencepiece, prompt_ids)
    assert detok.add(word[:1]) == " hello"
    assert detok.add(word[1:]) + detok.finish() == " world"


def test_incomplete_character_at_the_end_is_flushed(byte_level) -> None:
    ids = byte_level.encode("ok Ω", add_special_tokens=False)[:-1]  # the last byte of Ω cut off
    assert decode(byte_level, ids).endswith("\ufffd")
    detok = IncrementalDetokenizer(byte_level, [])
    text = detok.add(ids)
    assert "\ufffd" not in text
    assert text + detok.finish() == decode(byte_level, ids)


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_special_tokens_options(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hello = tokenizer.encode("hello", add_special_tokens=False)
    world = tokenizer.encode("wörld", add_special_tokens=False)
    ids = hello + [end, end] + world
    expected = {
        (True, True): decode(tokenizer, hello + world),
        (False, False): decode(tokenizer, ids, skip=False),
        # Spaced like slow Hugging Face tokenizers: text runs and specials joined by spaces.
        (False, True): " ".join(
            [decode(tokenizer, hello), "<|im_end|>", "<|im_end|>", decode(tokenizer, world)]
        ),
    }
    rng = random.Random(5)
    for (skip, spaces), text in expected.items():
        for _ in range(5):
            detok = IncrementalDetokenizer(tokenizer, [], skip, spaces)
            pieces, tail = stream(detok, ids, rng)
            assert "".join(pieces) + tail == text, (skip, spaces)
            assert detok.decode(ids) == text


# ---- stop strings ----------------------------------------------------------------------------


def cut_at_stop(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Reference: cut where the first stop string to complete ends (ties: the longest)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s and s in text]
    if not found:
        return text, False
    end, start, _ = min(found)
    return text[: end if include else start], True


def feed(checker: StopChecker, deltas: list[str]) -> tuple[list[str], bool]:
    out = []
    for delta in deltas:
        text, stopped = checker.add(delta)
        out.append(text)
        if stopped:
            return out, True
    out.append(checker.finish())
    return out, False


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_exactly_whatever_the_deltas(include: bool) -> None:
    rng = random.Random(6)
    alphabet = "ab日\n "
    for _ in range(2000):
        text = "".join(rng.choices(alphabet, k=rng.randint(1, 14)))
        stops = [
            "".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        expected, expect_stop = cut_at_stop(text, stops, include)
        deltas = random_split(text, rng)
        out, stopped = feed(StopChecker(stops, include), deltas)
        assert ("".join(out), stopped) == (expected, expect_stop), (text, stops, deltas)
        if stopped and not include:
            # Nothing of the stop string was ever sent, even in pieces.
            assert "".join(out) == text[: len("".join(out))]


def test_stop_checker_holds_back_a_possible_start() -> None:
    checker = StopChecker(["</end>"])
    assert checker.add("hello </") == ("hello ", False)
    assert checker.add("en") == ("", False)
    assert checker.add("x more") == ("</enx more", False)
    assert checker.add(" </e") == (" ", False)
    assert checker.add("nd> tail") == ("", True)
    assert checker.matched == "</end>"
    assert checker.add("later") == ("", True)


def test_no_stop_strings_pass_everything() -> None:
    checker = StopChecker(["", ""])
    assert checker.add("abc") == ("abc", False)
    assert checker.finish() == ""


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
@pytest.mark.parametrize("include", [False, True])
def test_text_stream_with_stop_strings(
    name: str, include: bool, request: pytest.FixtureRequest
) -> None:
    """Stop strings on tokens: split characters and deltas never leak a stop string."""
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(7)
    for _ in range(100):
        text = random_text(rng)
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = decode(tokenizer, ids)
        if len(full) < 3:
            continue
        start = rng.randrange(len(full) - 1)
        stops = [full[start : start + rng.randint(1, 4)], "never there"]
        expected, expect_stop = cut_at_stop(full, stops, include)
        out = TextStream(tokenizer, [], stops, include)
        pieces = []
        for i in range(len(ids)):
            pieces.append(out.add(ids[i : i + 1]))
            if out.stopped:
                break
        pieces.append(out.finish())
        assert out.stopped == expect_stop
        assert "".join(pieces) == expected, (full, stops)


# ---- token texts -----------------------------------------------------------------------------


def test_token_bytes_rebuild_the_text(byte_level, sentencepiece) -> None:
    rng = random.Random(8)
    for _ in range(50):
        text = random_text(rng).strip() or "x"
        ids = byte_level.encode(text, add_special_tokens=False)
        texts = TokenTexts(byte_level)
        assert b"".join(texts.bytes_of(i) for i in ids) == text.encode()
        ids = sentencepiece.encode(text, add_special_tokens=False)
        texts = TokenTexts(sentencepiece)
        # The sentencepiece marker of the first word is a space that decoding drops.
        assert b"".join(texts.bytes_of(i) for i in ids) == (" " + text).encode()


def test_token_text_of_a_partial_character(byte_level, sentencepiece) -> None:
    for tokenizer in (byte_level, sentencepiece):
        texts = TokenTexts(tokenizer)
        ids = tokenizer.encode("Ω", add_special_tokens=False)
        parts = [texts.text_of(i) for i in ids]
        assert any(p.startswith("bytes:\\x") for p in parts), parts
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert texts.text_of(end) == "<|im_end|>"
    cat = byte_level.encode(" cat", add_special_tokens=False)[0]
    assert TokenTexts(byte_level).text_of(cat) == byte_level.decode([cat])
    assert TokenTexts(byte_level).text_of(cat).startswith(" ")
