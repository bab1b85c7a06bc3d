"""What the approval agent accepts at submission, and how a chat tool's
``decision`` signal is read: whoever may signal a run writes that data, so
any shape of it must end in a decision, never in a crash of the run."""

from __future__ import annotations

from typing import Any

import pytest

from raftmesh.runner.agents.builtin import check_approval_input
from raftmesh.runner.agents.chat import read_decision
from raftmesh.runner.registry import InvalidInput


@pytest.mark.parametrize(
    "data, decided",
    [
        ({"approve": True}, (True, "")),
        ({"approve": False, "note": "not today"}, (False, "not today")),
        ({"approve": True, "by": "alice"}, (True, "")),
        ({"approve": True, "note": None}, (True, "")),
    ],
)
def test_a_well_formed_decision_is_read_as_given(data: Any, decided: tuple[bool, str]) -> None:
    assert read_decision(data) == decided


@pytest.mark.parametrize(
    "data, why",
    [
        ("yes", "was not {"),
        (None, "was not {"),
        ([True], "was not {"),
        ({}, "was not {"),
        ({"approve": "true"}, "was not {"),
        ({"approve": 1}, "was not {"),
        ({"approve": True, "note": 7}, "note must be text"),
        ({"approve": True, "note": ["a"]}, "note must be text"),
        ({"approve": True, "note": 0}, "note must be text"),
    ],
)
def test_any_other_decision_is_a_denial_saying_why(data: Any, why: str) -> None:
    approved, note = read_decision(data)
    assert approved is False and why in note, note


@pytest.mark.parametrize(
    "input",
    [{"prompt": "deploy?"}, {"prompt": None}, {"prompt": {"a": [1]}, "timeout_s": 0}],
)
def test_an_approval_input_with_a_prompt_is_accepted(input: Any) -> None:
    check_approval_input(input, {})


@pytest.mark.parametrize(
    "input",
    [
        "deploy?",
        {},
        {"prompt": "p", "timeout": 5},
        {"prompt": "p", "timeout_s": True},
        {"prompt": "p", "timeout_s": -1},
        {"prompt": "p", "timeout_s": float("nan")},
        {"prompt": "p", "timeout_s": "5"},
    ],
)
def test_any_other_approval_input_is_refused(input: Any) -> None:
    with pytest.raises(InvalidInput):
        check_approval_input(input, {})
