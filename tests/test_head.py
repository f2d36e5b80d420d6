"""The numpy SLM head: gradients against finite differences, what the hidden layer and the
n-gram channel buy."""

import numpy as np
import pytest

from fedhlm_app.slm.head import HeadConfig, HeadInputs, SoftmaxHead
from fedhlm_app.slm.ngrams import NgramBags

WORDS = "stocks rally oil team wins cup chip launch vote senate".split()


def _texts(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 6))) for _ in range(n)]


def _loss(head: SoftmaxHead, x, y, l2: float) -> float:
    weights = head.params[0::2]  # the weight matrices (L2 applies to them, not to the biases)
    return head.log_loss(x, y) + 0.5 * l2 * sum(float(np.sum(w * w)) for w in weights)


@pytest.mark.parametrize("hidden", [0, 5])
@pytest.mark.parametrize("buckets", [0, 16])
def test_gradients_match_finite_differences(hidden, buckets):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.integers(0, 3, 7)
    if buckets:
        x = HeadInputs(x, NgramBags.of(_texts(rng, 7), buckets))
    head = SoftmaxHead(4, 3, hidden, seed=1, ngram_buckets=buckets)
    head.params = [rng.normal(size=p.shape) for p in head.params]  # away from the zero start
    grads = head.gradients(x, np.eye(3)[y], l2=0.01)
    for param, grad in zip(head.params, grads):
        for index in np.ndindex(param.shape):
            old = param[index]
            param[index] = old + 1e-6
            up = _loss(head, x, y, 0.01)
            param[index] = old - 1e-6
            down = _loss(head, x, y, 0.01)
            param[index] = old
            assert grad[index] == pytest.approx((up - down) / 2e-6, abs=1e-6)


def test_the_hidden_layer_learns_what_a_linear_head_cannot():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(400, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(int)  # XOR of the signs
    cfg = HeadConfig(epochs=200, lr=0.01, batch_size=64, l2=0.0)
    linear = SoftmaxHead(2, 2).fit(x, y, cfg, np.random.default_rng(1))
    mlp = SoftmaxHead(2, 2, hidden=16, seed=0).fit(x, y, cfg, np.random.default_rng(1))
    accuracy = lambda head: float(np.mean(head.predict_proba(x).argmax(1) == y))  # noqa: E731
    assert accuracy(linear) < 0.7 < 0.9 < accuracy(mlp)


def test_set_params_refuses_other_shapes():
    with pytest.raises(ValueError, match="head shapes"):
        SoftmaxHead(4, 3, hidden=5).set_params(SoftmaxHead(4, 3).get_params())


def test_the_ngram_channel_learns_what_the_embedding_does_not_carry():
    rng = np.random.default_rng(0)
    texts = _texts(rng, 300)
    y = np.array([int("oil" in t.split()) for t in texts])  # the class is one word's presence
    noise = rng.normal(size=(300, 8))  # an embedding that knows nothing about it
    cfg = HeadConfig(epochs=30, lr=0.05, l2=0.0)
    plain = SoftmaxHead(8, 2).fit(noise[:200], y[:200], cfg, np.random.default_rng(1))
    inputs = HeadInputs(noise, NgramBags.of(texts, 1024))
    lexical = SoftmaxHead(8, 2, ngram_buckets=1024).fit(inputs[np.arange(200)], y[:200], cfg, np.random.default_rng(1))
    held_out = np.arange(200, 300)
    plain_acc = float(np.mean(plain.predict_proba(noise[held_out]).argmax(1) == y[held_out]))
    lexical_acc = float(np.mean(lexical.predict_proba(inputs[held_out]).argmax(1) == y[held_out]))
    majority = max(np.mean(y[held_out]), 1 - np.mean(y[held_out]))
    assert plain_acc < majority + 0.05 and lexical_acc > 0.95


def test_a_batch_updates_only_the_ngram_rows_it_contains():
    texts = ["oil prices", "team wins"]
    bags = NgramBags.of(texts, 1024)
    head = SoftmaxHead(2, 2, ngram_buckets=1024)
    head.fit(HeadInputs(np.zeros((1, 2)), bags[np.array([0])]), np.array([1]), HeadConfig(epochs=1), np.random.default_rng(0))
    changed = set(np.flatnonzero(np.abs(head.params[-1]).sum(axis=1)))
    assert changed == set(bags[np.array([0])].indices.tolist())
    assert not changed & set(bags[np.array([1])].indices.tolist())


def test_a_head_with_ngrams_refuses_inputs_without_them():
    head = SoftmaxHead(2, 2, ngram_buckets=1024)
    with pytest.raises(ValueError, match="n-gram bags of 1024 buckets"):
        head.predict_proba(np.zeros((1, 2)))


def test_fedprox_keeps_the_head_near_where_it_started():
    rng = np.random.default_rng(0)
    texts = _texts(rng, 200)
    y = np.array([int("oil" in t.split()) for t in texts])
    inputs = HeadInputs(rng.normal(size=(200, 8)), NgramBags.of(texts, 1024))
    start = SoftmaxHead(8, 2, ngram_buckets=1024, seed=3).get_params()
    moved = {}
    for mu in (0.0, 1.0, 100.0):
        head = SoftmaxHead(8, 2, ngram_buckets=1024).set_params([p.copy() for p in start])
        head.fit(inputs, y, HeadConfig(epochs=5, lr=0.05, l2=0.0, proximal_mu=mu), np.random.default_rng(1))
        moved[mu] = np.sqrt(sum(float(np.sum((p - s) ** 2)) for p, s in zip(head.get_params(), start)))
    assert moved[0.0] > moved[1.0] > moved[100.0] > 0  # dense and n-gram rows alike are pulled back
