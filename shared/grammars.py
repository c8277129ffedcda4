"""A request's Grammar as xgrammar's grammar: the one translation the frontend and workers share.

The frontend builds it to refuse a bad schema, regular expression or EBNF with a 400 before the
request goes anywhere; rank 0 of the workers builds the same one and compiles it against the
tokenizer's vocabulary into the per-step token masks. Building it is cheap (parsing, no
vocabulary); compiling is the workers' (workers/grammar.py).

xgrammar is imported when first needed: it imports torch and transformers, which the scheduler
must never load and a frontend that serves no grammar need not.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from vlmserve.shared.messages import Grammar

if TYPE_CHECKING:
    import xgrammar

# xgrammar's errors begin with a time and a C++ source position: not the client's business.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """The constraint cannot be built; the message says why, in the client's terms."""


def to_xgrammar(grammar: Grammar) -> xgrammar.Grammar:
    """xgrammar's grammar for `grammar`; raises GrammarError when it cannot be built.

    JSON is written compactly, without free whitespace between tokens (`{"a": 1, "b": [2]}`
    spacing), as vLLM does with `disable_any_whitespace`: with free whitespace a model, and
    certainly a random one, can spend its whole budget on spaces and newlines. json_object is
    "any JSON object" under the same rule. Objects take only the properties their schema names
    (xgrammar's strict mode, vLLM's default), in the schema's order.
    """
    import xgrammar

    try:
        match grammar.kind:
            case "json_schema":
                return _json_strings_fixed(
                    xgrammar.Grammar.from_json_schema(grammar.spec, any_whitespace=False)
                )
            case "json_object":
                return xgrammar.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
            case "regex":
                return xgrammar.Grammar.from_regex(grammar.spec)
            case "choice":
                return xgrammar.Grammar.from_ebnf(choice_ebnf(json.loads(grammar.spec)))
            case "ebnf":
                return xgrammar.Grammar.from_ebnf(grammar.spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(error_text(exc)) from None
    raise GrammarError(f"unknown grammar kind {grammar.kind!r}")


# xgrammar 0.2.9 writes the characters of a string with minLength/maxLength as this class,
# which lets raw control characters (U+0000-U+001F but \r and \n) into the string: JSON that
# no parser accepts. Its unbounded strings use the right class; bounded ones get it here.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _json_strings_fixed(built: xgrammar.Grammar) -> xgrammar.Grammar:
    import xgrammar

    text = str(built)
    if _LOOSE_STRING_CHAR not in text:
        return built
    return xgrammar.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (a non-empty list of strings).

    Each is a string literal in JSON's escaping (xgrammar's EBNF takes the same escapes); non
    ASCII characters stay as they are, since JSON's surrogate pairs are not EBNF escapes.
    """
    if not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("a choice needs a non-empty list of strings")
    if any(c == "" for c in choices):
        raise GrammarError("a choice may not be the empty string")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def error_text(exc: BaseException) -> str:
    """An xgrammar error's message without its C++ prefix, on one line."""
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(exc).splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__
