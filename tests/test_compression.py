"""Compressed model updates: quantization bounds, the wire format, error feedback, replicas in step,
and aggregation of compressed updates against dense aggregation."""

import numpy as np
import pytest

from fedhlm_app.fl.compression import (
    EXACT,
    LEVELS,
    SCALE_BIAS,
    SCALE_STEPS,
    SPARSE_MIN_ROWS,
    VALUE_FORMATS,
    Codec,
    ErrorFeedback,
    decode_model,
    encode,
    encode_model,
    pack_rows,
    unpack_rows,
)
from fedhlm_app.fl.model_sync import FROM_ZERO, ModelDelta, ModelSync, client_upload, whole


def _model(rng, rows=SPARSE_MIN_ROWS * 2, touched=3000):
    """A head-shaped model: dense weights and bias, and a tall table with a few non-zero rows."""
    table = np.zeros((rows, 4), np.float32)
    table[rng.choice(rows, touched, replace=False)] = rng.normal(size=(touched, 4))
    return [rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32), table]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantization_round_trip_is_within_half_a_step_of_each_row(fmt):
    rng = np.random.default_rng(0)
    # rows whose largest values span 1e-5 to 1e4, within the steps a scale codes
    delta = rng.normal(size=(5000, 4)).astype(np.float32) * rng.lognormal(-2, 2.5, size=(5000, 1)).astype(np.float32)
    decoded = encode(delta, Codec(fmt)).decode()
    step = np.abs(delta).max(axis=1, keepdims=True) / LEVELS[fmt]
    # half a step, the step rounded up to a power of 2^(1/8) (at most 9% wider), and never finer than
    # the smallest step a one-byte scale codes (tiny rows)
    smallest = 2.0 ** ((1 - SCALE_BIAS) / SCALE_STEPS)
    bound = np.maximum(step * 2.0 ** (1 / SCALE_STEPS), smallest) / 2 * (1 + 1e-6)
    assert np.all(np.abs(decoded - delta) <= bound)
    assert np.abs(decoded - delta).max() > 0  # it is lossy: the bound is what is tested


def test_a_row_beyond_the_largest_step_is_clipped_not_wrapped():
    largest_step = 2.0 ** ((255 - SCALE_BIAS) / SCALE_STEPS)
    delta = np.array([[1e9, -1e9, 0.0, 1.0]], np.float32)
    decoded = encode(delta, Codec("int4")).decode()
    np.testing.assert_allclose(decoded[0, :2], [7 * largest_step, -7 * largest_step])


def test_fp16_round_trip_is_relative_and_fp32_is_exact():
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(300, 4)).astype(np.float32)
    assert np.array_equal(encode(delta, EXACT).decode(), delta)
    half = encode(delta, Codec("fp16")).decode()
    assert np.all(np.abs(half - delta) <= np.abs(delta) * 2.0**-11 + 1e-7)


def test_only_changed_rows_travel_and_a_share_keeps_the_largest():
    rng = np.random.default_rng(2)
    model = _model(rng)
    table = encode(model[2], Codec("fp32", 1.0))
    assert np.array_equal(table.rows, np.flatnonzero(np.abs(model[2]).sum(1)))
    kept = encode(model[2], Codec("fp32", 0.1))
    assert len(kept.rows) == 300
    norms = np.linalg.norm(model[2], axis=1)
    assert norms[kept.rows].min() >= np.sort(norms)[-300]  # the 300 largest rows
    small = encode(model[0], Codec("fp32", 0.1))  # a small array travels whole, whatever the share
    assert len(small.rows) == 16


@pytest.mark.parametrize("fmt", VALUE_FORMATS)
def test_wire_format_round_trips_and_rejects_malformed_messages(fmt):
    rng = np.random.default_rng(3)
    message = ModelDelta(4, 5, encode_model(_model(rng), Codec(fmt, 0.5)))
    arrays = message.to_arrays()
    assert set(arrays) == {"meta", "rows", "codes", "scales"}
    back = ModelDelta.from_arrays(arrays)
    assert (back.base, back.version) == (4, 5)
    for a, b in zip(decode_model(back.tables), decode_model(message.tables)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        ModelDelta.from_arrays({**arrays, "codes": arrays["codes"][:-3]})
    with pytest.raises(ValueError):
        ModelDelta.from_arrays({**arrays, "meta": arrays["meta"][:-1]})
    with pytest.raises(ValueError):
        ModelDelta.from_arrays({k: v for k, v in arrays.items() if k != "rows"})


def test_row_indices_pack_small_and_must_be_sorted():
    rows = np.sort(np.random.default_rng(4).choice(2**17, 5000, replace=False))
    packed = pack_rows(rows)
    assert packed.size < 2 * len(rows)  # gaps deflated: under 2 bytes a row (int64 would be 8)
    np.testing.assert_array_equal(unpack_rows(packed, len(rows)), rows)
    wide = np.array([0, 100_000, 2**20])
    np.testing.assert_array_equal(unpack_rows(pack_rows(wide), 3), wide)
    with pytest.raises(ValueError):
        unpack_rows(packed, len(rows) - 1)
    shuffled = encode(np.ones((8, 2), np.float32), EXACT)
    bad = type(shuffled)(shuffled.shape, "fp32", np.array([3, 1, 2, 0, 4, 5, 6, 7]), shuffled.codes, shuffled.scales)
    with pytest.raises(ValueError):
        bad.decode()


def test_error_feedback_loses_nothing_it_only_delays():
    """Over any number of rounds, what was sent plus what is still held back equals everything wanted."""
    rng = np.random.default_rng(5)
    feedback, codec = ErrorFeedback(), Codec("int4", 0.05)
    wanted_total = [np.zeros_like(p) for p in _model(rng)]
    sent_total = [np.zeros_like(p) for p in wanted_total]
    for _ in range(6):
        delta = _model(rng)
        _, sent = feedback.compress(delta, codec)
        wanted_total = [w + d for w, d in zip(wanted_total, delta)]
        sent_total = [s + x for s, x in zip(sent_total, sent)]
    for w, s, r in zip(wanted_total, sent_total, feedback.residual):
        np.testing.assert_allclose(s + r, w, atol=1e-4)


def test_replicas_stay_in_step_and_a_client_that_fell_behind_gets_the_model_whole():
    rng = np.random.default_rng(6)
    sync = ModelSync(Codec("int4", 0.1), Codec("int4", 0.5))
    first = sync.broadcast(0, _model(rng))
    assert first.base == FROM_ZERO
    replica = first.apply(None, None)
    sync.acknowledge(7, 0)
    for _ in range(3):  # node 7 follows every broadcast, node 8 joins late
        message = sync.broadcast(0, [p + 0.1 * q for p, q in zip(sync.held[0], _model(rng))])
        assert sync.message_for(7, 0, message) is message
        replica = message.apply(replica, message.base)
        sync.acknowledge(7, 0)
        for mine, theirs in zip(replica, sync.held[0]):
            np.testing.assert_array_equal(mine, theirs)  # bit for bit what the server holds
    late = sync.message_for(8, 0, message)
    assert late.base == FROM_ZERO
    for a, b in zip(late.apply(None, None), sync.held[0]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        message.apply(replica, message.base - 1)  # a delta applied to the wrong version is refused


def test_compressed_aggregation_matches_dense_aggregation_within_the_quantization_bound():
    """FedAvg of models rebuilt from int8 deltas of every changed row, against FedAvg of the models themselves."""
    rng = np.random.default_rng(7)
    start = _model(rng)
    sync = ModelSync(Codec("int8", 1.0), Codec("int8", 1.0))
    sync.broadcast(0, start)
    clients = [[s + 0.01 * d for s, d in zip(start, _model(rng))] for _ in range(5)]
    weights = np.array([10.0, 20.0, 30.0, 15.0, 25.0]) / 100.0
    rebuilt = [sync.client_model(0, client_upload(c, start, 0, sync.codec_up, ErrorFeedback())) for c in clients]
    for layer in range(3):
        dense = sum(w * c[layer] for w, c in zip(weights, clients))
        compressed = sum(w * r[layer] for w, r in zip(weights, rebuilt))
        step = max(np.abs(c[layer] - start[layer]).max() for c in clients) / LEVELS["int8"]
        assert np.abs(compressed - dense).max() <= step / 2 * 1.01


def test_uncompressed_messages_carry_the_whole_model():
    rng = np.random.default_rng(8)
    model = _model(rng)
    sync = ModelSync(None, None)
    message = sync.broadcast(0, model)
    assert message.base == FROM_ZERO and all(t.rows is None for t in message.tables)
    upload = client_upload(model, model, 0, None, ErrorFeedback())
    for a, b in zip(sync.client_model(0, upload), model):
        np.testing.assert_array_equal(a, b)
    assert whole(model).tables[2].rows.size == 3000  # a whole model sent exactly: its non-zero rows


def test_a_malformed_or_stale_model_update_is_rejected_with_its_reason():
    from flwr.app import MetricRecord, RecordDict

    from fedhlm_app.app.protocol import ModelUpdate, node_update, pack_model

    rng = np.random.default_rng(9)
    sync = ModelSync(Codec("int4", 0.1), Codec("int4", 0.5))
    start = _model(rng)
    sync.broadcast(0, start)
    good = ModelUpdate(client_upload(_model(rng), start, 0, sync.codec_up, ErrorFeedback()), {"num-examples": 3.0}).pack()
    assert node_update(1, good, lambda m: sync.client_model(0, m)).problem is None
    broken = RecordDict({"model": pack_model(ModelDelta(0, 0, [])), "metrics": MetricRecord({"num-examples": 3.0})})
    broken["model"]["codes"] = broken["model"]["meta"]  # bytes that do not add up
    assert "malformed" in node_update(2, broken, lambda m: sync.client_model(0, m)).problem
    stale = ModelUpdate(client_upload(_model(rng), start, 7, sync.codec_up, ErrorFeedback()), {"num-examples": 3.0}).pack()
    assert "version 7" in node_update(3, stale, lambda m: sync.client_model(0, m)).problem
