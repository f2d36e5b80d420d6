"""The oracle interface: partial answers, the fallback, the wire format, prompts (pure logic)."""

import json

import numpy as np
import pytest

from fedhlm_app.data.datasets import Split
from fedhlm_app.oracle.base import EscalationBatch, Oracle, OracleError, verify_safely
from fedhlm_app.oracle.prompts import LabelPrompt, few_shot_examples
from fedhlm_app.oracle.wire import (
    WireError,
    parse_distribution_reply,
    parse_verify_reply,
    parse_verify_request,
    verify_reply,
    verify_request,
)

C = 4


class Scripted(Oracle):
    """Answers with a fixed q (NaN rows: no answer), or raises."""

    def __init__(self, q=None, error=None):
        super().__init__(C, seed=0)
        self.q, self.error = q, error

    def distribution(self, texts):
        if self.error:
            raise self.error
        return self.q


def _batch(n, drafts=None):
    p = np.full((n, C), 1 / C)
    return EscalationBatch(np.arange(10, 10 + n), [f"text {i}" for i in range(n)], p, np.array(drafts or [0] * n))


def test_unanswered_rows_fall_back_to_the_draft_and_the_rest_are_verified():
    q = np.eye(C)[[2, 0, 1]].astype(float)
    q[1] = np.nan  # the backend had no answer for item 1
    result = Scripted(q).verify(_batch(3, drafts=[1, 3, 1]))
    assert result.answered.tolist() == [True, False, True]
    assert result.failed == 1 and "1 items without a usable answer" in result.failure
    assert result.final_classes(np.array([1, 3, 1])).tolist() == [2, 3, 1]  # rejected -> LLM label; kept; accepted
    assert result.verdict.beta.tolist() == [1.0, 0.0]


def test_rows_that_are_not_distributions_count_as_unanswered():
    q = np.array([[0.5, 0.5, 0.5, 0.0], [-0.1, 0.6, 0.5, 0.0], [0.25] * 4])
    assert Scripted(q).verify(_batch(3)).answered.tolist() == [False, False, True]


@pytest.mark.parametrize("error", [OracleError("down"), ConnectionRefusedError("refused"), ValueError("bug")])
def test_verify_safely_never_raises_and_keeps_the_cause(error):
    result = verify_safely(Scripted(error=error), _batch(5))
    assert result.failed == 5 and type(error).__name__ in result.failure
    assert result.final_classes(np.arange(5) % C).tolist() == (np.arange(5) % C).tolist()


def test_a_wrongly_shaped_answer_is_a_failure_not_a_crash():
    result = verify_safely(Scripted(np.ones((2, C)) / C), _batch(3))
    assert result.failed == 3 and "shape" in result.failure


def test_take_splits_a_merged_verification_per_client():
    q = np.eye(C)[[1, 1, 2, 3]].astype(float)
    q[2] = np.nan
    merged = Scripted(q).verify(_batch(4, drafts=[1, 0, 0, 3]))
    first, second = merged.take(0, 2), merged.take(2, 4)
    assert first.answered.tolist() == [True, True] and first.verdict.final.tolist() == [1, 1] and first.failure == ""
    assert second.answered.tolist() == [False, True] and second.verdict.final.tolist() == [3] and second.failure


def _request(**changes):
    body = {"texts": ["a", "b"], "probs": [[0.7, 0.1, 0.1, 0.1], [0.25] * 4], "drafts": [0, 3]}
    return {**body, **changes}


def test_a_valid_request_parses():
    batch = parse_verify_request(_request(), C, max_items=8)
    assert batch.texts == ["a", "b"] and batch.drafts.tolist() == [0, 3] and batch.probs.shape == (2, C)


@pytest.mark.parametrize(
    "request_body, status, words",
    [
        ([1, 2], 400, "JSON object"),
        ({"probs": []}, 400, "'texts'"),
        (_request(texts=["a", 3]), 400, "texts[1]"),
        (_request(drafts=[0]), 400, "differ in length"),
        (_request(probs=[[0.7, 0.3], [0.25] * 4]), 400, "probs[0] must be a list of 4"),
        (_request(probs=[[0.7, 0.1, 0.1, 0.2], [0.25] * 4]), 400, "sums to 1.1"),
        (_request(probs=[[float("nan"), 0.1, 0.1, 0.1], [0.25] * 4]), 400, "finite number"),
        (_request(probs=[[1.1, -0.1, 0.0, 0.0], [0.25] * 4]), 400, "greater than or equal to 0"),
        (_request(drafts=[0, 4]), 400, "drafts[1] = 4"),
        (_request(drafts=[0, True]), 400, "drafts[1]"),
        (_request(texts=["a"] * 9, probs=[[0.25] * 4] * 9, drafts=[0] * 9), 413, "at most 8"),
    ],
)
def test_bad_requests_name_the_problem(request_body, status, words):
    with pytest.raises(WireError) as err:
        parse_verify_request(request_body, C, max_items=8)
    assert err.value.status == status and words in str(err.value)
    assert json.dumps(err.value.body())  # always a JSON error body


def test_verify_reply_round_trips_through_json():
    q = np.eye(C)[[2, 0, 1]].astype(float)
    q[1] = np.nan
    result = Scripted(q).verify(_batch(3, drafts=[1, 3, 1]))
    wire = json.loads(verify_reply(result).model_dump_json(exclude_none=True))
    back = parse_verify_reply(wire, 3, C)
    assert back.answered.tolist() == result.answered.tolist()
    assert back.verdict.final.tolist() == result.verdict.final.tolist()
    assert np.allclose(back.q[[0, 2]], q[[0, 2]]) and np.isnan(back.q[1]).all()
    assert json.loads(json.dumps(verify_request(_batch(2))))["drafts"] == [0, 0]


@pytest.mark.parametrize(
    "reply",
    [
        {"answered": [True, True]},  # two answers for three items, and nothing else
        {"answered": [True, True, True], "beta": [0, 0, 0], "accepted": [1, 1, 1], "final": [0, 9, 0]},
        {"answered": [True] * 3, "beta": [0, 0], "accepted": [1, 1, 1], "final": [0, 0, 0]},
        "not an object",
    ],
)
def test_malformed_replies_are_oracle_errors(reply):
    with pytest.raises(OracleError, match="malformed"):
        parse_verify_reply(reply, 3, C)
    with pytest.raises(OracleError, match="malformed"):
        parse_distribution_reply({"q": [[0.25] * 4]}, 3, C)


def test_prompt_parsing_finds_the_one_label_an_answer_names():
    prompt = LabelPrompt(["World", "Sports", "Business", "Sci/Tech"], [])
    assert prompt.parse("Sports") == 1
    assert prompt.parse(" sci/tech.\n") == 3
    assert prompt.parse("The topic is Business") == 2
    assert prompt.parse("Technology") is None  # names no label word exactly
    assert prompt.parse("tech") == 3  # a part of 'Sci/Tech'
    assert prompt.parse("World or Sports") is None  # two labels: no answer
    assert "World, Sports, Business or Sci/Tech" in prompt.instruction()


def test_few_shot_examples_are_balanced_deterministic_and_short():
    labels = np.array([0, 1, 2, 3] * 5)
    split = Split([f"text {i} " + "word " * 100 for i in range(20)], labels)
    shots = few_shot_examples(split, per_class=2, num_classes=C, seed=3)
    assert [y for _, y in shots] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert shots == few_shot_examples(split, per_class=2, num_classes=C, seed=3)
    assert all(len(t) <= 310 for t, _ in shots)
    prompt = LabelPrompt(["World", "Sports", "Business", "Sci/Tech"], shots)
    assert prompt.completion("Red Sox win").endswith("Text: Red Sox win\nTopic:")
    messages = prompt.chat("Red Sox win")
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "Text: Red Sox win"}
    assert len(messages) == 2 + 2 * len(shots)


@pytest.mark.parametrize("accuracy", [1.0, 0.9, 0.5])
def test_the_noisy_labels_oracle_is_right_on_its_share_of_texts_and_always_the_same_way(accuracy):
    from fedhlm_app.data.datasets import load_local
    from fedhlm_app.oracle.base import NoisyLabelsOracle, is_distribution
    from fedhlm_app.paths import BUNDLED_DATA

    data = load_local(BUNDLED_DATA, "train.csv", "test.csv")
    oracle = NoisyLabelsOracle(data, seed=1, accuracy=accuracy)
    texts, labels = data.test.texts[:3000], data.test.labels[:3000]
    q = oracle.distribution(texts)
    assert is_distribution(q).all()
    assert abs((q.argmax(axis=1) == labels).mean() - accuracy) < 0.03
    np.testing.assert_array_equal(oracle.distribution(texts[::-1]), q[::-1])  # the same text, the same answer
    wrong = q.argmax(axis=1) != labels
    if wrong.any():  # wrong answers spread over the other classes
        assert len(np.unique(q.argmax(axis=1)[wrong])) == C
