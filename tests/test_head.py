"""The numpy SLM head: gradients against finite differences, and what the hidden layer buys."""

import numpy as np
import pytest

from fedhlm_app.head import HeadConfig, SoftmaxHead


def _loss(head: SoftmaxHead, x, y, l2: float) -> float:
    weights = head.params[0::2]  # the weight matrices (L2 applies to them, not to the biases)
    return head.log_loss(x, y) + 0.5 * l2 * sum(float(np.sum(w * w)) for w in weights)


@pytest.mark.parametrize("hidden", [0, 5])
def test_gradients_match_finite_differences(hidden):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.integers(0, 3, 7)
    head = SoftmaxHead(4, 3, hidden, seed=1)
    if not hidden:
        head.params = [rng.normal(size=(4, 3)), rng.normal(size=3)]
    grads = head._gradients(x, np.eye(3)[y], l2=0.01)
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
