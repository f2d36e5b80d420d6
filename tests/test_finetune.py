"""Fine-tuning the encoder's top layers (tiny BERT): what trains, what travels, what is installed."""

import numpy as np
import pytest

from fedhlm_app.slm.features import EncoderSpec, featurize
from fedhlm_app.slm.finetune import EncoderTuner, TuningConfig, length_bucketed_batches

TEXTS = ["stocks rally on wall street", "oil prices climb again", "the team wins the cup final",
         "striker scores twice in derby", "shares fall as profits slump", "coach praises young squad"] * 4
LABELS = np.array([0, 0, 1, 1, 0, 1] * 4)


def test_only_the_top_layers_and_the_classifier_travel(tiny_bert):
    tuner = EncoderTuner(str(tiny_bert), 1, 2)
    assert all(name.startswith("encoder.layer.1.") for name in tuner.trained)
    arrays = tuner.get_arrays()
    assert len(arrays) == len(tuner.trained) + 2 and arrays[-2].shape == (2, 32)
    with pytest.raises(ValueError, match="shapes do not match"):
        tuner.set_arrays(arrays[:-1])
    with pytest.raises(ValueError, match="encoder-layers = 3, but the encoder has 2 layers"):
        EncoderTuner(str(tiny_bert), 3, 2)


def test_training_lowers_the_loss_and_leaves_the_frozen_layers_alone(tiny_bert):
    tuner = EncoderTuner(str(tiny_bert), 1, 2)
    frozen = {n: p.detach().clone() for n, p in tuner.model.named_parameters() if n not in tuner.trained}
    before = tuner.get_arrays()
    cfg = TuningConfig(steps=30, batch_size=8, lr=1e-3)
    first = tuner.train(TEXTS, LABELS, TuningConfig(steps=1, batch_size=8, lr=1e-3), np.random.default_rng(0))
    last = tuner.train(TEXTS, LABELS, cfg, np.random.default_rng(1))
    assert last < first
    assert all(np.array_equal(p.detach(), frozen[n]) for n, p in tuner.model.named_parameters() if n in frozen)
    assert not np.array_equal(before[0], tuner.get_arrays()[0])


def test_install_writes_one_checkpoint_per_weights_that_the_featurizer_reads(tiny_bert, tmp_path):
    tuner = EncoderTuner(str(tiny_bert), 1, 2)
    base = featurize(TEXTS[:6], EncoderSpec(str(tiny_bert), 32, "fp32"), tmp_path)
    tuner.train(TEXTS, LABELS, TuningConfig(steps=5, batch_size=8, lr=1e-2), np.random.default_rng(0))
    folder = tuner.install(tmp_path)
    assert folder == tuner.install(tmp_path) and folder.parent == tmp_path / "models"
    tuned = featurize(TEXTS[:6], EncoderSpec(str(folder), 32, "fp32"), tmp_path)
    assert tuned.shape == base.shape and not np.allclose(tuned, base, atol=1e-4)
    # another process rebuilds the same encoder from the arrays alone
    again = EncoderTuner(str(tiny_bert), 1, 2).set_arrays(tuner.get_arrays())
    assert again.install(tmp_path) == folder


def test_length_bucketed_batches_cover_every_text_once():
    lengths = list(np.random.default_rng(0).integers(1, 100, 1000))
    batches = length_bucketed_batches(lengths, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches if len(b) == 32])
    assert spread < 10  # similar lengths in a batch: little padding


def test_a_seed_reproduces_the_training_and_leaves_torch_s_generator_alone(tiny_bert):
    import torch

    tuners = [EncoderTuner(str(tiny_bert), 1, 2) for _ in range(3)]

    def trained(tuner, seed):
        tuner.train(TEXTS, LABELS, TuningConfig(steps=3, batch_size=8, lr=1e-3), np.random.default_rng(seed))
        return tuner.get_arrays()

    state = torch.random.get_rng_state()
    first, again, other = trained(tuners[0], 0), trained(tuners[1], 0), trained(tuners[2], 1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # dropout masks included
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert torch.equal(torch.random.get_rng_state(), state)
