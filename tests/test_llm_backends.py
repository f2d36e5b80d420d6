"""The model backends with real offline models: SmolLM2 as a causal LM and behind a real
OpenAI-compatible server (`transformers serve`), and a MiniLM classifier fine-tuned by our command.

Models load once per test session; a handful of AG News items each.
"""

import numpy as np
import pytest

from fedhlm_app.config import ConfigError, validate
from fedhlm_app.data.datasets import load_local
from fedhlm_app.oracle.base import EscalationBatch, is_distribution, make_oracle, verify_safely
from fedhlm_app.paths import BUNDLED_DATA
from helpers import default_run_config

N_ITEMS = 6


@pytest.fixture(scope="module")
def dataset():
    return load_local(BUNDLED_DATA, "train.csv", "test.csv")


def _cfg(tmp_path, **overrides):
    return validate(default_run_config(**{"cache-dir": str(tmp_path / "cache"), "oracle-batch-size": 4, **overrides}))


def _batch(dataset, n=N_ITEMS):
    probs = np.full((n, dataset.num_classes), 1 / dataset.num_classes)
    return EscalationBatch(np.arange(n), dataset.test.texts[:n], probs, np.zeros(n, np.int64))


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    from fedhlm_app.oracle.causal_lm import export_hf_folder

    return export_hf_folder("smollm2", tmp_path_factory.mktemp("smollm2-hf"))


@pytest.fixture(scope="module")
def chat_server(smollm2_folder, tmp_path_factory):
    """`transformers serve` on loopback with SmolLM2: a real OpenAI-compatible server."""
    from fedhlm_app.oracle.causal_lm import serve_openai_compatible

    proc, url = serve_openai_compatible(smollm2_folder, tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_backend_against_a_real_chat_server(chat_server, smollm2_folder, dataset, tmp_path):
    cfg = _cfg(tmp_path, oracle="openai", **{"oracle-url": chat_server + "/v1", "oracle-model": str(smollm2_folder),
                                             "oracle-few-shot": 1, "oracle-concurrency": 2})
    oracle = make_oracle(cfg, dataset)
    result = verify_safely(oracle, _batch(dataset))
    traffic = oracle.traffic.drain()
    assert traffic.requests >= N_ITEMS and traffic.sent > N_ITEMS * 200 and traffic.received > N_ITEMS * 100
    assert result.answered.sum() >= N_ITEMS // 2, result.failure  # a 135M model names a label most of the time
    answered_q = result.q[result.answered]
    assert is_distribution(answered_q).all()
    if not oracle.use_logprobs:  # the server refused logprobs: q is one-hot on the label the model wrote
        assert set(np.unique(answered_q)) <= {0.0, 1.0}
    # answers are cached: asking again sends nothing
    again = oracle.distribution(dataset.test.texts[:N_ITEMS])
    assert oracle.traffic.drain().requests == N_ITEMS - int(result.answered.sum())
    assert np.allclose(again[result.answered], answered_q)


def test_openai_backend_needs_a_url_and_a_model(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="oracle-url"):
        make_oracle(_cfg(tmp_path, oracle="openai", **{"oracle-model": "m"}), dataset)


def test_causal_lm_backend_gives_a_soft_distribution_over_labels(dataset, tmp_path):
    oracle = make_oracle(_cfg(tmp_path, oracle="causal-lm", **{"oracle-model": "smollm2", "oracle-few-shot": 1}), dataset)
    assert oracle.chat and len(set(oracle.label_tokens)) == dataset.num_classes
    q = oracle.distribution(dataset.test.texts[:N_ITEMS])
    assert q.shape == (N_ITEMS, dataset.num_classes) and is_distribution(q).all()
    assert np.all(q.max(axis=1) < 1.0)  # a real softmax, not a label
    assert np.allclose(oracle.compute(dataset.test.texts[:2]), q[:2], atol=1e-6)  # deterministic
    prefix, _ = oracle._prefix()
    assert len(prefix) > 50  # the instruction and examples: computed once, shared by every prompt
    oracle.prefix_caching = False  # every prompt run whole, left-padded: the same distributions
    assert np.allclose(oracle.compute(dataset.test.texts[:N_ITEMS]), q, atol=1e-5)
    # cached on disk: a fresh store over the same folder answers without the model
    from fedhlm_app.slm.features import FeatureStore

    oracle.store = FeatureStore(oracle.store.folder)
    oracle.compute = lambda texts: pytest.fail("recomputed a cached answer")
    assert np.allclose(oracle.distribution(dataset.test.texts[:N_ITEMS]), q, atol=1e-6)


def test_causal_lm_rejects_an_unknown_model_before_loading(dataset, tmp_path):
    with pytest.raises(ConfigError, match="not smollm2, gemma3"):
        make_oracle(_cfg(tmp_path, oracle="causal-lm", **{"oracle-model": str(tmp_path / "nothing")}), dataset)


@pytest.fixture(scope="module")
def minilm_classifier(tmp_path_factory):
    from fedhlm_app.oracle.train_classifier import main

    out = tmp_path_factory.mktemp("clf") / "cloud-minilm"
    assert main(["--base", "minilm", "--out", str(out), "--max-train-items", "96", "--eval-items", "32",
                 "--batch-size", "16", "--lr", "1e-4"]) == 0
    return out


def test_train_classifier_writes_a_checkpoint_the_classifier_backend_serves(minilm_classifier, dataset, tmp_path):
    import json

    record = json.loads((minilm_classifier / "fedhlm_training.json").read_text())
    assert record["train_items"] == 96 and record["steps"] == 6 and 0.0 <= record["test_accuracy"] <= 1.0
    oracle = make_oracle(_cfg(tmp_path, oracle="classifier", **{"oracle-model": str(minilm_classifier)}), dataset)
    result = verify_safely(oracle, _batch(dataset))
    assert result.failed == 0 and is_distribution(result.q).all()
    assert np.all(result.q.max(axis=1) < 1.0)


def test_train_classifier_refuses_to_overwrite_and_bad_checkpoints_fail_early(minilm_classifier, dataset, tmp_path):
    from fedhlm_app.oracle.train_classifier import main

    with pytest.raises(SystemExit):
        main(["--base", "minilm", "--out", str(minilm_classifier)])  # exists: needs --overwrite
    with pytest.raises(ConfigError, match="no config.json"):
        make_oracle(_cfg(tmp_path, oracle="classifier", **{"oracle-model": str(tmp_path)}), dataset)
    with pytest.raises(ConfigError, match="needs run-config 'oracle-model'"):
        make_oracle(_cfg(tmp_path, oracle="classifier"), dataset)
    wrong = load_local(BUNDLED_DATA, "train.csv", "test.csv")
    wrong.class_names[:] = ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="not the dataset's classes"):
        make_oracle(_cfg(tmp_path, oracle="classifier", **{"oracle-model": str(minilm_classifier)}), wrong)
