"""`TolerantChatAdapter` on the sloppy answers small models write: what it reads from each,
that well-formed answers take DSPy's strict path unchanged, and that `fill_missing=False`
still raises as `ChatAdapter` does."""

from __future__ import annotations

import enum
import subprocess
import sys
from typing import Any, Literal

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from openbeepboop.integrations.dspy import TolerantChatAdapter


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class QA(dspy.Signature):  # type: ignore[misc]
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Reasoned(dspy.Signature):  # type: ignore[misc]
    question: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    answer: int = dspy.OutputField()


class Label(dspy.Signature):  # type: ignore[misc]
    text: str = dspy.InputField()
    sentiment: Literal["positive", "negative"] = dspy.OutputField()
    sarcastic: bool = dspy.OutputField()
    mood: Mood = dspy.OutputField()


@pytest.mark.parametrize(
    "completion",
    [
        "Paris",  # a lone output field as plain text
        "  Paris  \n",
        "Answer: Paris",
        "answer:Paris",
        "ANSWER: Paris",
        "[[ ## Answer ## ]]\nParis",  # wrong case
        "[[## answer ##]] Paris",  # spacing, value on the header line
        "[[ ## answer ]]\nParis",  # a broken marker
        "## answer ##\nParis",
        "### Answer\nParis",
        "**Answer:** Paris",
        "**answer**: Paris",
        "Sure! Here you go.\n[[ ## answer ## ]]\nParis\n[[ ## completed ## ]]\nHope that helps.",
        "[[ ## question ## ]]\nWhat is the capital?\n[[ ## answer ## ]]\nParis",  # echoed input
        '{"Answer": "Paris"}',
        'Here is JSON: {"answer": "Paris",',  # broken JSON, repaired
        "<think>The capital of France... Paris.</think>Paris",
        "[[ ## answer ## ]]\n\n[[ ## answer ## ]]\nParis",  # an empty section, then the value
    ],
)
def test_reads_a_sloppy_single_field(completion: str) -> None:
    assert TolerantChatAdapter().parse(QA, completion) == {"answer": "Paris"}


BIG = int("1" * 400)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Reasoning: two and two\nAnswer: 4", {"reasoning": "two and two", "answer": 4}),
        (
            "two and two make four\n[[ ## answer ## ]]\n4",
            {"reasoning": "two and two make four", "answer": 4},
        ),
        (
            "[[ ## reasoning ## ]]\nsimple\n[[ ## answer ## ]]\nabout 4 apples",
            {"reasoning": "simple", "answer": 4},
        ),
        ('{"reasoning": "easy", "ANSWER": "4"}', {"reasoning": "easy", "answer": 4}),
        ("Let me see: none\nanswer: 4.0", {"reasoning": "Let me see: none", "answer": 4}),
        ("Reasoning: count\nAnswer: 1,000 apples", {"reasoning": "count", "answer": 1000}),
        ("Reasoning: count\nAnswer: 12_345_678", {"reasoning": "count", "answer": 12345678}),
        ("Reasoning: count\nAnswer: 4,5", {"reasoning": "count", "answer": 4}),
        ("Reasoning: big\nAnswer: about " + "1" * 400, {"reasoning": "big", "answer": BIG}),
        ("Reasoning: too big\nAnswer: about 1e400", {"reasoning": "too big", "answer": None}),
        ("Reasoning: too big\nAnswer: 1e400", {"reasoning": "too big", "answer": None}),
    ],
)
def test_reads_several_fields_and_coerces_types(completion: str, expected: dict[str, Any]) -> None:
    assert TolerantChatAdapter().parse(Reasoned, completion) == expected


def test_literal_bool_and_enum_values_named_anywhere() -> None:
    completion = "Sentiment: it is clearly NEGATIVE\nSarcastic: Yes.\nMood: rather sad, I think"
    assert TolerantChatAdapter().parse(Label, completion) == {
        "sentiment": "negative",
        "sarcastic": True,
        "mood": Mood.SAD,
    }


def test_missing_fields_are_filled() -> None:
    assert TolerantChatAdapter().parse(Reasoned, "") == {"reasoning": "", "answer": None}
    assert TolerantChatAdapter().parse(Reasoned, "no number here") == {
        "reasoning": "no number here",
        "answer": None,
    }


def test_fill_missing_false_raises_like_chat_adapter() -> None:
    with pytest.raises(AdapterParseError):
        TolerantChatAdapter(fill_missing=False).parse(Reasoned, "no number here")
    assert TolerantChatAdapter(fill_missing=False).parse(QA, "Answer: Paris") == {"answer": "Paris"}


def test_well_formed_answers_parse_as_chat_adapter_does() -> None:
    completion = (
        "[[ ## reasoning ## ]]\nNote: a header-like line\n\n"
        "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"
    )
    strict = dspy.ChatAdapter().parse(Reasoned, completion)
    assert TolerantChatAdapter().parse(Reasoned, completion) == strict
    assert strict == {"reasoning": "Note: a header-like line", "answer": 4}


def test_a_header_like_line_that_names_no_field_stays_text() -> None:
    completion = "Answer: Paris\nNote: it is also the largest city"
    assert TolerantChatAdapter().parse(QA, completion) == {
        "answer": "Paris\nNote: it is also the largest city"
    }


def test_formats_prompts_as_chat_adapter_and_does_not_fall_back_to_json() -> None:
    tolerant, chat = TolerantChatAdapter(), dspy.ChatAdapter()
    inputs = {"question": "Why?"}
    assert tolerant.format(QA, [], inputs) == chat.format(QA, [], inputs)
    assert tolerant.use_json_adapter_fallback is False


def test_nothing_imports_dspy_until_asked() -> None:
    code = (
        "import sys, openbeepboop, openbeepboop.client, openbeepboop.integrations;"
        "from openbeepboop import Client;"
        "assert 'dspy' not in sys.modules, 'dspy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
