import numpy as np
import pytest

from fedhlm_app.slm.uncertainty import MEASURES, get_measure, normalized_entropy


def test_entropy_is_zero_for_one_hot_and_one_for_uniform():
    p = np.array([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    assert normalized_entropy(p) == pytest.approx([0.0, 1.0])


def test_entropy_matches_definition():
    p = np.array([[0.7, 0.2, 0.1]])
    expected = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)) / np.log(3)
    assert normalized_entropy(p)[0] == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_every_measure_is_in_unit_interval_and_orders_confidence(name):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=200)
    u = get_measure(name)(p)
    assert u.shape == (200,) and np.all((u >= 0) & (u <= 1))
    sharp, flat = np.array([[0.97, 0.01, 0.01, 0.01]]), np.array([[0.3, 0.3, 0.2, 0.2]])
    assert get_measure(name)(sharp)[0] < get_measure(name)(flat)[0]


def test_unknown_measure_is_named():
    with pytest.raises(ValueError, match="unknown uncertainty measure 'foo'"):
        get_measure("foo")


def test_temperature_perturbation_is_the_expected_disagreement_of_sampled_tokens():
    # U-HLM samples K tokens at temperatures theta_k and counts those that differ from the draft;
    # the measure is that count's expectation, so a large Monte Carlo sample must agree with it.
    from fedhlm_app.slm.uncertainty import PERTURBATION_TEMPERATURES, temperature_perturbation, with_temperature

    p = np.array([[0.6, 0.3, 0.1]])
    rng = np.random.default_rng(0)
    differ = [rng.choice(3, size=4000, p=with_temperature(p, t)[0]) != 0 for t in PERTURBATION_TEMPERATURES]
    assert temperature_perturbation(p)[0] == pytest.approx(np.mean(differ) * 3 / 2, abs=0.01)
    assert temperature_perturbation(np.full((1, 4), 0.25))[0] == pytest.approx(1.0)


def test_the_config_accepts_exactly_the_registered_measures():
    from fedhlm_app import config
    from helpers import default_run_config

    for name in MEASURES:
        assert config.validate(default_run_config(uncertainty=name)).uncertainty == name
    with pytest.raises(config.ConfigError, match="uncertainty"):
        config.validate(default_run_config(uncertainty="variance"))
