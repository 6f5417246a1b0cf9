"""The benchmarks' workload: the tutorial's sizes, random inputs, the model,
capjax's train step.

Random weights and features: the work done does not depend on their values.
Nothing here needs TensorFlow or a config, so the accelerator check uses it.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.training import device_data
from capjax.training import parallel
from capjax.training import state as state_lib
from capjax.training import step as step_lib


class Sizes(NamedTuple):
  vocab_size: int  # V
  embedding_dim: int  # E
  units: int  # U
  num_locations: int  # L
  feature_dim: int  # D


TUTORIAL = Sizes(
  vocab_size=5001,
  embedding_dim=256,
  units=512,
  num_locations=64,
  feature_dim=2048,
)
VOCAB_SIZE, EMBEDDING_DIM, UNITS, NUM_LOCATIONS, FEATURE_DIM = TUTORIAL
BATCH_SIZE = 64

# Keras' Adam defaults, which the tutorial trains with; no clipping.
LEARNING_RATE, ADAM_B1, ADAM_B2, ADAM_EPS = 1e-3, 0.9, 0.999, 1e-7


def model(
  sizes: Sizes = TUTORIAL, dtype: Any = jnp.float32
) -> captioner.Captioner:
  return captioner.Captioner(
    vocab_size=sizes.vocab_size,
    embedding_dim=sizes.embedding_dim,
    units=sizes.units,
    dtype=dtype,
  )


def random_features(
  rng: np.random.Generator, n: int, sizes: Sizes = TUTORIAL
) -> np.ndarray:
  """Non-negative (n, L, D) float32 grids, like InceptionV3's ReLU outputs."""
  return np.abs(
    rng.normal(size=(n, sizes.num_locations, sizes.feature_dim))
  ).astype(np.float32)


def random_tokens(
  rng: np.random.Generator,
  length: int,
  batch_size: int = BATCH_SIZE,
  vocab_size: int = VOCAB_SIZE,
) -> np.ndarray:
  """(B, length) ids of real words, no padding: the cost depends on T only."""
  tokens = rng.integers(
    vocab_lib.Vocab.end_id + 1, vocab_size, size=(batch_size, length)
  )
  tokens[:, 0] = vocab_lib.Vocab.start_id
  return tokens.astype(np.int32)


class CapjaxTrainer:
  """capjax's jitted train step, its state donated and kept between calls."""

  def __init__(self, sizes: Sizes = TUTORIAL, dtype: Any = jnp.float32):
    self.model = model(sizes, dtype)
    tx = state_lib.adam(
      LEARNING_RATE, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, grad_clip_norm=0.0
    )
    self._state = state_lib.create_train_state(
      self.model, tx, (sizes.num_locations, sizes.feature_dim), seed=0
    )
    self._step = jax.jit(
      functools.partial(
        step_lib.train_step, model=self.model, tx=tx, attention_penalty=0.0
      ),
      donate_argnums=0,
    )

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    self._state, _ = self._step(self._state, batch)
    return self._state.params

  def on_ids(self, ids_B: jax.Array, tables: dict[str, jax.Array]) -> jax.Array:
    """A step on rows `ids_B` of device-resident 'features' and 'tokens',
    gathered inside the step as config.device_data does."""
    self._state, _ = self._gather_step(self._state, ids_B, tables)
    return self._state.params

  @functools.cached_property
  def _gather_step(self):
    mesh = parallel.make_mesh()

    def step(state, ids_B, tables):
      batch = {
        name: device_data.gather_rows(table, ids_B, 'replicated', mesh)
        for name, table in tables.items()
      }
      return self._step(state, batch)

    return jax.jit(step, donate_argnums=0)


def batch(
  features_BLD: np.ndarray, tokens_BT: np.ndarray
) -> dict[str, jax.Array]:
  """A CapjaxTrainer's batch, on JAX's default device."""
  return {
    'features': jnp.asarray(features_BLD),
    'tokens': jnp.asarray(tokens_BT, jnp.int32),
  }
