"""The benchmarks' workload: the tutorial's sizes, random inputs, the model.

Random weights and features: the work done does not depend on their values.
"""

import numpy as np

from capjax.data import vocab as vocab_lib
from capjax.model import captioner

# The tutorial's sizes.
VOCAB_SIZE, EMBEDDING_DIM, UNITS = 5001, 256, 512
NUM_LOCATIONS, FEATURE_DIM, BATCH_SIZE = 64, 2048, 64


def model() -> captioner.Captioner:
  return captioner.Captioner(vocab_size=VOCAB_SIZE,
                             embedding_dim=EMBEDDING_DIM, units=UNITS)


def random_features(rng: np.random.Generator, n: int) -> np.ndarray:
  """Non-negative (n, L, D) float32 grids, like InceptionV3's ReLU outputs."""
  return np.abs(rng.normal(size=(n, NUM_LOCATIONS, FEATURE_DIM))).astype(
      np.float32)


def random_tokens(rng: np.random.Generator, length: int) -> np.ndarray:
  """(B, length) ids of real words, no padding: the cost depends on T only."""
  tokens = rng.integers(vocab_lib.Vocab.end_id + 1, VOCAB_SIZE,
                        size=(BATCH_SIZE, length))
  tokens[:, 0] = vocab_lib.Vocab.start_id
  return tokens.astype(np.int32)
