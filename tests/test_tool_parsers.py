"""Tool-call and reasoning parsers (frontend/tool_parsers, frontend/reasoning) over answers
written as the model families write them: Qwen2.5 / Hermes `<tool_call>` blocks, Llama 3.1
JSON, Mistral `[TOOL_CALLS]`, and the JSON a forced `tool_choice` makes. Each answer is parsed
whole, split in two at every position and fed one character at a time: the pieces always join
to the whole answer's result, and a call's first piece names it while later pieces carry its
arguments, as OpenAI streams them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest

from vlmserve.frontend.output import ChoiceOutput, OutputDelta, OutputParser, ToolCall
from vlmserve.frontend.reasoning import DeepSeekR1, Qwen3
from vlmserve.frontend.tool_parsers import Hermes, Llama3Json, Mistral
from vlmserve.frontend.tool_parsers.forced import NamedCall, RequiredCalls

WEATHER = '{"city": "Paris", "unit": "celsius"}'
TIME = '{"tz": "Europe/Paris", "when": {"day": "today", "hours": [9, 17]}}'


def counter_ids() -> Callable[[], str]:
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def run(parser: OutputParser, pieces: list[str], reason: str) -> tuple[ChoiceOutput, str]:
    joined = ChoiceOutput()
    for piece in pieces:
        joined.add(parser.feed(piece))
    rest, reason = parser.finish(reason)
    joined.add(rest)
    return joined, reason


def check(
    make: Callable[[], OutputParser],
    text: str,
    content: str,
    calls: list[tuple[str, str]] = (),
    reason: str = "stop",
    reasoning: str = "",
    finish: str | None = None,
) -> None:
    """`text` parses to `content`, `calls` and `reasoning` however it is split."""
    expected = ChoiceOutput(
        content, reasoning, [ToolCall(f"call_{i}", n, a) for i, (n, a) in enumerate(calls)]
    )
    whole = (expected, finish or ("tool_calls" if calls and reason == "stop" else reason))
    assert run(make(), [text], reason) == whole
    for at in range(len(text) + 1):
        assert run(make(), [text[:at], text[at:]], reason) == whole, f"split at {at}"
    assert run(make(), list(text), reason) == whole, "one character at a time"


def streamed_calls(make: Callable[[], OutputParser], text: str) -> list[OutputDelta]:
    """The deltas of `text` fed one character at a time."""
    parser = make()
    deltas = [parser.feed(ch) for ch in text]
    deltas.append(parser.finish("stop")[0])
    return [d for d in deltas if d.tool_calls]


# ---- hermes (Qwen2.5, Qwen3, Hermes 2 Pro) -----------------------------------------------------


def hermes() -> Hermes:
    return Hermes(counter_ids())


def block(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def test_hermes_one_call() -> None:
    check(hermes, block("get_weather", WEATHER), "", [("get_weather", WEATHER)])


def test_hermes_text_before_between_and_after_calls() -> None:
    two = block("get_weather", WEATHER) + "\n" + block("get_time", TIME)
    calls = [("get_weather", WEATHER), ("get_time", TIME)]
    check(hermes, "Let me look that up.\n" + two, "Let me look that up.\n", calls)
    # Whitespace that only leads to a call or to the end is not content.
    check(hermes, "\n\n" + two + "\n", "", calls)
    check(hermes, " \n", "")
    check(hermes, two + "\nI'll wait for the results.", "\nI'll wait for the results.", calls)


def test_hermes_call_written_another_way() -> None:
    # Keys in another order, compact JSON, no line breaks: read whole when the object closes.
    text = '<tool_call>{"arguments":{"city":"Paris"},"name":"get_weather"}</tool_call>'
    check(hermes, text, "", [("get_weather", '{"city": "Paris"}')])
    # Arguments holding tags, escapes and brackets in strings.
    args = '{"html": "<b>\\"hi\\"</b> </tool", "n": {"a": [1, {"b": "}"}]}}'
    check(hermes, block("render", args), "", [("render", args)])


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\nnot json at all\n</tool_call>",
        '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n["get_weather", {"city": "Paris"}]\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arg',  # cut before the arguments began
    ],
)
def test_hermes_malformed_calls_stay_content(bad: str) -> None:
    check(hermes, "Sure. " + bad + " Done.", "Sure. " + bad + " Done.")
    check(hermes, bad, bad)


def test_hermes_cut_call_keeps_what_was_written() -> None:
    # max_tokens hit inside the arguments: the call as far as it went, finish reason "length".
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    check(hermes, text, "", [("get_weather", '{"city": "Par')], reason="length")
    # A block closed inside the arguments ends the call there.
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1</tool_call>ok'
    check(hermes, text, "ok", [("f", '{"a": 1')], finish="tool_calls")


def test_hermes_plain_answers_and_partial_tags_are_content() -> None:
    check(hermes, "The weather in Paris is mild. <tool", "The weather in Paris is mild. <tool")
    check(hermes, "a < b and <tool> is not </tool_call>", "a < b and <tool> is not </tool_call>")
    check(hermes, "", "")


def test_hermes_streams_the_name_first_then_argument_pieces() -> None:
    deltas = streamed_calls(hermes, block("get_weather", WEATHER) + block("get_time", TIME))
    for index in (0, 1):
        pieces = [c for d in deltas for c in d.tool_calls if c.index == index]
        assert pieces[0].id == f"call_{index}" and pieces[0].name
        assert all(p.id is None and p.name is None for p in pieces[1:])
        assert len(pieces) > 10  # the arguments came as they were written


# ---- llama3_json (Llama 3.1 / 3.2) ----------------------------------------------------------


def llama() -> Llama3Json:
    return Llama3Json(counter_ids())


def test_llama3_json_calls() -> None:
    one = f'{{"name": "get_weather", "parameters": {WEATHER}}}'
    two = f'{{"name": "get_time", "parameters": {TIME}}}'
    check(llama, one, "", [("get_weather", WEATHER)])
    check(llama, "<|python_tag|>" + one, "", [("get_weather", WEATHER)])
    check(llama, f"\n{one}; {two}", "", [("get_weather", WEATHER), ("get_time", TIME)])
    check(llama, f"{one}\n\nThat is all.", "That is all.", [("get_weather", WEATHER)])


def test_llama3_json_other_answers_are_content() -> None:
    check(llama, "Paris is sunny today.", "Paris is sunny today.")
    check(llama, 'It is {"name": "x"}', 'It is {"name": "x"}')  # not at the start
    check(llama, '{"city": "Paris", "temp": 21}', '{"city": "Paris", "temp": 21}')
    check(llama, '{"name": "f", "parameters"', '{"name": "f", "parameters"')  # cut in its head
    check(llama, "  <|python", "  <|python")


# ---- mistral ---------------------------------------------------------------------------------


def mistral() -> Mistral:
    return Mistral(counter_ids())


def test_mistral_calls() -> None:
    array = (
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
        f'{{"name": "get_time", "arguments": {TIME}}}]'
    )
    check(mistral, array, "", [("get_weather", WEATHER), ("get_time", TIME)])
    check(
        mistral, "Checking. " + array, "Checking. ", [("get_weather", WEATHER), ("get_time", TIME)]
    )
    single = f'[TOOL_CALLS]{{"name": "get_weather", "arguments": {WEATHER}}}'
    check(mistral, single, "", [("get_weather", WEATHER)])
    v11 = f"[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]get_time[ARGS]{TIME}"
    check(mistral, v11, "", [("get_weather", WEATHER), ("get_time", TIME)])


def test_mistral_malformed_is_content() -> None:
    check(mistral, "No tools needed [TOOL", "No tools needed [TOOL")
    check(mistral, "[TOOL_CALLS]no call here", "[TOOL_CALLS]no call here")
    check(mistral, '[TOOL_CALLS][{"city": "Paris"}]', '{"city": "Paris"}]')
    check(mistral, "[TOOL_CALLS]bad name[ARGS]{}", "[TOOL_CALLS]bad name[ARGS]{}")


def test_mistral_ids_are_nine_letters_and_digits() -> None:
    parser = Mistral()
    out, _ = run(parser, [f'[TOOL_CALLS][{{"name": "f", "arguments": {WEATHER}}}]'], "stop")
    assert len(out.tool_calls[0].id) == 9 and out.tool_calls[0].id.isalnum()
    assert Mistral.keeps_special_tokens and not Hermes.keeps_special_tokens


# ---- forced by tool_choice -------------------------------------------------------------------


def test_named_choice_reads_the_answer_as_the_arguments() -> None:
    check(
        lambda: NamedCall("get_weather", counter_ids()),
        "\n" + WEATHER,
        "",
        [("get_weather", WEATHER)],
    )
    check(lambda: NamedCall("f", counter_ids()), "", "")


def test_required_choice_reads_an_array_of_calls() -> None:
    answer = json.dumps(
        [
            {"name": "get_weather", "parameters": json.loads(WEATHER)},
            {"name": "get_time", "parameters": json.loads(TIME)},
        ]
    )
    calls = [("get_weather", WEATHER), ("get_time", json.dumps(json.loads(TIME)))]
    required = lambda: RequiredCalls(counter_ids())  # noqa: E731
    check(required, answer + "\n ", "", calls)
    # Not an array of calls (a model left unconstrained): content from where it stops being one.
    check(required, "Sure thing", "Sure thing")
    check(required, ' [{"name": "f", "param', ' [{"name": "f", "param', reason="length")
    check(required, '[{"name": "f"}, 3]', "3]", [("f", "{}")])
    check(required, '[{"name": "f", "parameters": {}}] and more', " and more", [("f", "{}")])


# ---- reasoning, and reasoning before tool calls ----------------------------------------------


def test_deepseek_r1_reasoning() -> None:
    check(
        DeepSeekR1,
        "<think>\nThe user wants x.\n</think>\n\nx",
        "\n\nx",
        reasoning="\nThe user wants x.\n",
    )
    # The template opened <think>: the answer starts inside it.
    check(DeepSeekR1, "Hmm, 2 + 2.</think>4", "4", reasoning="Hmm, 2 + 2.")
    check(DeepSeekR1, "still thinking <", "", reasoning="still thinking <", reason="length")


def test_qwen3_reasoning() -> None:
    check(Qwen3, "<think>\nsimple\n</think>\n\nHello!", "\n\nHello!", reasoning="\nsimple\n")
    check(Qwen3, "Hello! no thinking </think>", "Hello! no thinking </think>")
    check(Qwen3, "<thin", "<thin")
    check(Qwen3, "<think>cut", "", reasoning="cut", reason="length")


def test_reasoning_is_split_before_tool_calls_are_read() -> None:
    from vlmserve.frontend.output import ReasoningThenAnswer

    def make() -> OutputParser:
        return ReasoningThenAnswer(Qwen3(), Hermes(counter_ids()))

    # A call written inside the thinking is reasoning, not a call.
    thinking = "<think>\nMaybe " + block("nope", "{}") + "\n</think>\n\n"
    text = thinking + "On it.\n" + block("get_weather", WEATHER)
    reasoning = "\nMaybe " + block("nope", "{}") + "\n"
    check(make, text, "\n\nOn it.\n", [("get_weather", WEATHER)], reasoning=reasoning)


def test_only_the_first_call_without_parallel_tool_calls() -> None:
    from vlmserve.frontend.output import ReasoningThenAnswer

    def make() -> OutputParser:
        return ReasoningThenAnswer(None, Hermes(counter_ids()), max_calls=1)

    text = block("get_weather", WEATHER) + block("get_time", TIME)
    check(make, text, "", [("get_weather", WEATHER)])
