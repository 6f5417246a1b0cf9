"""The benchmarks' accounting: FLOP counts and bucket mixes."""

import numpy as np

from capjax.benchmarks import flops as flops_lib
from capjax.benchmarks import training
from capjax.configs import default


def test_flop_counts():
  flops = [flops_lib.train_flops(t) for t in (2, 16, 32, 48)]
  assert all(a < b for a, b in zip(flops, flops[1:]))
  # Each extra token adds the same work: one recurrent step and its outputs.
  assert np.isclose(flops[2] - flops[1], flops[3] - flops[2])
  # One predicted step: the tutorial's W1 runs once, as capjax's does.
  assert flops_lib.tutorial_train_flops(2) == flops_lib.train_flops(2)
  ratios = [
    flops_lib.tutorial_train_flops(t) / flops_lib.train_flops(t)
    for t in (16, 32, 48)
  ]
  assert 2 < ratios[0] < ratios[1] < ratios[2] < 3


def test_bucket_frequencies_follow_the_pipeline():
  rng = np.random.default_rng(0)
  lengths = np.clip(rng.poisson(12, 5000), 4, 48).astype(np.int32)
  image_index = np.arange(5000) // 5
  config = default.get_config()
  mixes = []
  for group_by_length in (False, True):
    config.group_by_length = group_by_length
    mix = training.bucket_frequencies(lengths, image_index, config)
    assert set(mix) <= set(config.bucket_lengths)
    assert np.isclose(sum(mix.values()), 1.0)
    mixes.append(sum(t * f for t, f in mix.items()))
  random_mean, grouped_mean = mixes
  assert grouped_mean < 0.8 * random_mean
