import numpy as np
import pytest

from fedhlm_app.data.partition import cluster_of_partition, partition_clients, query_streams


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 4, size=4000), rng.integers(0, 4, size=1200)


def test_partition_is_disjoint_complete_and_deterministic(labels):
    train, test = labels
    a = partition_clients(train, test, 10, 0.5, 7, 0.2, 10)
    b = partition_clients(train, test, 10, 0.5, 7, 0.2, 10)
    rows = np.concatenate([np.r_[c.fit, c.calibration] for c in a])
    assert sorted(rows.tolist()) == list(range(len(train)))
    assert abs(sum(len(c.test) for c in a) - len(test)) <= len(a)  # as many queries as test rows, in all
    assert all(np.array_equal(x.fit, y.fit) and np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert all(abs(len(c.calibration) - 0.2 * (len(c.fit) + len(c.calibration))) <= 1 for c in a)


def test_small_alpha_skews_labels_more_than_large_alpha(labels):
    train, test = labels

    def mean_max_share(alpha):
        parts = partition_clients(train, test, 10, alpha, 7, 0.2, 5)
        return np.mean([np.bincount(train[np.r_[c.fit, c.calibration]], minlength=4).max() / (len(c.fit) + len(c.calibration)) for c in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def _mix(labels, rows, num_classes=3):
    return np.bincount(labels[rows], minlength=num_classes) / len(rows)


def test_queries_are_sampled_from_the_clients_own_mix_then_shift_to_the_pooled_one():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 3, size=30000)
    test = rng.integers(0, 3, size=30000)
    parts = [np.flatnonzero(train == 0), np.flatnonzero(train != 0)]  # client 0 knows class 0 only
    own = query_streams(test, parts, train, shift=0.0, drift=0.0, seed=0)
    assert set(test[own[0]].tolist()) == {0} and np.sum(test[own[1]] == 0) == 0
    pooled = query_streams(test, parts, train, shift=1.0, drift=0.0, seed=0)
    np.testing.assert_allclose(_mix(test, pooled[0]), _mix(train, np.arange(len(train))), atol=0.03)
    half = query_streams(test, parts, train, shift=0.5, drift=0.0, seed=0)
    assert abs(_mix(test, half[0])[0] - (0.5 + 0.5 / 3)) < 0.03
    # sampled, not allocated: a stream repeats rows, and its mix is right only in expectation
    assert len(np.unique(own[0])) < len(own[0])
    assert abs(len(own[0]) - len(parts[0]) / len(train) * len(test)) <= 1


def test_drift_moves_the_query_mix_toward_the_pooled_one_along_the_stream():
    rng = np.random.default_rng(2)
    train, test = rng.integers(0, 3, size=30000), rng.integers(0, 3, size=30000)
    parts = [np.flatnonzero(train == 0), np.flatnonzero(train != 0)]
    stream = query_streams(test, parts, train, shift=0.0, drift=1.0, seed=0)[0]
    first, last = stream[: len(stream) // 5], stream[-len(stream) // 5 :]
    assert _mix(test, first)[0] > 0.85 and _mix(test, last)[0] < 0.5  # from its own class toward the pooled mix


def test_cluster_rule_makes_contiguous_blocks():
    assert [cluster_of_partition(i, 20, 4) for i in range(20)] == [i // 5 for i in range(20)]


@pytest.mark.parametrize("num_partitions,alpha,seed", [(20, 0.5, 42), (50, 1.0, 3), (7, 0.2, 0)])
def test_dirichlet_split_is_draw_for_draw_flwr_datasets(num_partitions, alpha, seed):
    """Our numpy port gives exactly flwr-datasets' DirichletPartitioner partitions."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    from fedhlm_app.data.partition import dirichlet_train_partition

    train = np.random.default_rng(1).integers(0, 4, size=5000)
    reference = DirichletPartitioner(num_partitions, "label", alpha, min_partition_size=10, self_balancing=True, seed=seed)
    reference.dataset = datasets.Dataset.from_dict({"label": train.tolist(), "row": np.arange(len(train))})
    ours = dirichlet_train_partition(train, num_partitions, alpha, seed, 10)
    for pid, part in enumerate(ours):
        assert np.array_equal(part, np.sort(np.asarray(reference.load_partition(pid)["row"])))


def test_impossible_min_partition_size_is_a_clear_error():
    from fedhlm_app.data.partition import dirichlet_train_partition

    with pytest.raises(ValueError, match="min-partition-size"):
        dirichlet_train_partition(np.zeros(100, dtype=int), 20, 0.5, 0, 50)


def test_query_counts_follow_train_sizes_and_pooled_streams_follow_the_pooled_mix():
    rng = np.random.default_rng(3)
    train, test = rng.integers(0, 4, 4000), np.repeat(np.arange(4), 500)
    clients = partition_clients(train, test, 5, 0.1, 0, 0.2, 10, query_shift=1.0)
    train_sizes = np.array([len(c.fit) + len(c.calibration) for c in clients])
    np.testing.assert_allclose([len(c.test) for c in clients], train_sizes / train_sizes.sum() * len(test), atol=1)
    # the biggest client's queries follow the pooled mix, not its own skewed one
    big = clients[int(np.argmax(train_sizes))]
    own_mix = np.bincount(train[np.concatenate([big.fit, big.calibration])], minlength=4) / train_sizes.max()
    query_mix = np.bincount(test[big.test], minlength=4) / len(big.test)
    assert np.abs(query_mix - 0.25).max() < 0.1 < np.abs(own_mix - 0.25).max()


def test_validation_rows_are_held_out_of_train_and_replace_the_test_split():
    from fedhlm_app.data.datasets import Dataset, Split

    rng = np.random.default_rng(4)
    train = Split([f"train {i}" for i in range(1000)], rng.integers(0, 4, 1000))
    test = Split([f"test {i}" for i in range(300)], rng.integers(0, 4, 300))
    data = Dataset(train, test, ["a", "b", "c", "d"], "x")
    held = data.validation(0.1, seed=7)
    assert len(held.test) == 100 and len(held.train) == 900
    assert set(held.test.texts) | set(held.train.texts) == set(train.texts)  # all from train, none lost
    assert not set(held.test.texts) & set(held.train.texts) and not set(held.test.texts) & set(test.texts)
    assert held.test.texts == data.validation(0.1, seed=7).test.texts  # seeded
