"""Incremental detokenization, stop strings, and token texts for logprobs.

Decoding one token at a time is wrong in two ways: a byte-level tokenizer splits a
multi-byte character over tokens (each piece alone decodes to U+FFFD), and a
sentencepiece tokenizer drops the leading space of the first token it decodes. So, like
Hugging Face's TextStreamer, we decode a small window of already-emitted tokens plus the
new ones and emit what the window's text grew by, and wait while the text ends in an
incomplete character.

The same objects serve non-streamed answers (join everything `add` returns, then
`finish`), so a streamed answer and a non-streamed one are the same text.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
# Prompt tokens decoded with the first new ones: enough for a leading space to survive and to
# start before a character that a few byte tokens spell.
PROMPT_CONTEXT = 5
MAX_CHAR_BYTES = 4


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer used here."""

    def decode(self, token_ids: list[int], **kwargs: object) -> str: ...
    def convert_ids_to_tokens(self, ids: int) -> str | None: ...


def special_token_ids(tokenizer: object) -> set[int]:
    """Ids that skip_special_tokens removes: special added tokens and the named specials."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return {i for i, tok in added.items() if getattr(tok, "special", True)} | set(
        getattr(tokenizer, "all_special_ids", [])
    )


class IncrementalDetokenizer:
    """Turns one sequence's new token ids into new text, one step at a time."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Only special tokens that stay in the text are spaced out (as slow HF tokenizers did);
        # fast tokenizers ignore the option, so we split the decode at them ourselves.
        spaced = not skip_special_tokens and spaces_between_special_tokens
        self._spaced_ids = special_token_ids(tokenizer) if spaced else set()
        start = self._context_start(prompt_ids)
        self._ids: list[int] = list(prompt_ids[start:])
        # _ids[_prefix:_read] were emitted already and are decoded again as context;
        # _ids[_read:] are tokens whose text has not been emitted yet.
        self._prefix = 0
        self._read = len(self._ids)

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids` under this detokenizer's options."""
        if not self._spaced_ids:
            return self._decode_run(token_ids)
        pieces: list[str] = []
        run: list[int] = []
        for token_id in token_ids:
            if token_id in self._spaced_ids:
                if run:
                    pieces.append(self._decode_run(run))
                    run = []
                pieces.append(self._decode_run([token_id]))
            else:
                run.append(token_id)
        if run:
            pieces.append(self._decode_run(run))
        return " ".join(pieces)

    def add(self, token_ids: list[int]) -> str:
        """Append new tokens; return the text they complete (may be "" while a char is split)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """Text still held back at the end (an incomplete character comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self.decode(self._ids[self._prefix : self._read])
        text = self.decode(self._ids[self._prefix :])
        # Wait while the newest tokens spell part of a character, or add no text
        # (a skipped special token): the next token may complete it.
        if len(text) <= len(prefix_text) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text) :]

    def _decode_run(self, token_ids: list[int]) -> str:
        # No clean-up of spaces: it depends on the next token, which a stream has not seen.
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special,
            clean_up_tokenization_spaces=False,
        )

    def _context_start(self, prompt_ids: list[int]) -> int:
        """Where the prompt context begins: a few tokens back, not inside a character."""
        start = max(len(prompt_ids) - PROMPT_CONTEXT, 0)
        # A window that starts inside a character decodes to U+FFFD there, and some decoders
        # (sentencepiece byte fallback) then garble the whole run of byte tokens with it.
        for _ in range(MAX_CHAR_BYTES - 1):
            if start == 0 or not self.decode(prompt_ids[start:]).startswith(REPLACEMENT):
                break
            start -= 1
        return start


class StopChecker:
    """Cuts the text at the first stop string, never streaming any part of one.

    Fed text deltas, it returns what may be sent now. A tail that could be the start of a
    stop string is held back until the next delta shows whether it is one. The first stop
    string to be completed wins (on a tie, the one that starts first), so the result does
    not depend on how the text was split into deltas.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = [s for s in stop if s]
        self._include = include_stop_str_in_output
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def add(self, delta: str) -> tuple[str, bool]:
        """(text to emit now, whether a stop string matched). After a match, always ("", True)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.stopped, self.matched, self._held = True, stop, ""
            return text[: start + len(stop) if self._include else start], True
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def finish(self) -> str:
        """The held-back tail, once no more text will come."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                best = candidate if best is None else min(best, candidate)
        return None if best is None else (best[1], best[2])

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that some stop string begins with."""
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0


class TextStream:
    """One choice's output text: detokenizer then stop strings, in one object.

    `add` gives the text to send for new tokens; `stopped` says a stop string matched (send
    an Abort: the engine does not know stop strings). Call `finish` when the engine ends the
    sequence, to get the text still held back.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens, spaces_between_special_tokens
        )
        self.stop = StopChecker(stop, include_stop_str_in_output)

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def add(self, token_ids: list[int]) -> str:
        if self.stop.stopped:
            return ""
        text, _ = self.stop.add(self.detokenizer.add(token_ids))
        return text

    def finish(self) -> str:
        if self.stop.stopped:
            return ""
        text, stopped = self.stop.add(self.detokenizer.finish())
        return text if stopped else text + self.stop.finish()


# ---- token texts for logprobs ----------------------------------------------------------------


def _gpt2_byte_chars() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


class TokenTexts:
    """Each token's bytes and its OpenAI logprobs `token` string, cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = repr(getattr(backend, "decoder", None))
        self._byte_level = "ByteLevel" in decoder
        self._metaspace = "Metaspace" in decoder or "ByteFallback" in decoder
        self._byte_chars = _gpt2_byte_chars() if self._byte_level else {}
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self._added = {i: tok.content for i, tok in added.items()}
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        if token_id not in self._cache:
            self._cache[token_id] = self._bytes(token_id)
        return self._cache[token_id]

    def text_of(self, token_id: int) -> str:
        """The token as text; part of a character is written "bytes:\\xe6\\x97", as OpenAI does."""
        data = self.bytes_of(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            # Real checkpoints pad their embedding past the tokenizer (Qwen2: 152,064 rows for
            # 151,665 tokens), so the model can score, and pick, an id that no token spells.
            # It has no text: it is reported as "" with no bytes, which is what vLLM reports
            # (its decode of such an id) and what the answer's text gets from it (decode skips
            # it), so the logprob tokens still join to the text.
            return b""
        if self._byte_level and all(c in self._byte_chars for c in piece):
            return bytes(self._byte_chars[c] for c in piece)
        if self._metaspace:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])  # byte fallback token
            return piece.replace("\u2581", " ").encode()
        return self._tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode()
