"""SCST step time against a cross-entropy step, at the tutorial's sizes.

The SCST step (capjax.training.scst) takes 64 images and samples K = 5
captions of each, so it is compared with a cross-entropy step on 64 x 5 =
320 captions. Random weights never choose <end>, so every sample runs the
full MAX_LEN tokens, and the cross-entropy captions are that long too: both
steps see 320 captions of MAX_LEN tokens. The reward's share of the SCST
step is measured by taking it out: the same step with a constant reward.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from capjax.benchmarks import harness
from capjax.benchmarks import workload
from capjax.configs import default
from capjax.metrics import cider
from capjax.training import scst
from capjax.training import state as state_lib
from capjax.training import step as step_lib

SAMPLES, REFERENCES, MAX_LEN = 5, 5, 24


def _references(rng: np.random.Generator) -> np.ndarray:
  """(B, R, MAX_LEN + 1) random captions of 8 to MAX_LEN - 1 words."""
  tokens = rng.integers(
    4, workload.VOCAB_SIZE, size=(workload.BATCH_SIZE, REFERENCES, MAX_LEN + 1)
  ).astype(np.int32)
  tokens[..., 0] = 1
  lengths = rng.integers(8, MAX_LEN, size=tokens.shape[:2])
  for index in np.ndindex(*tokens.shape[:2]):
    tokens[index][lengths[index]] = 2
    tokens[index][lengths[index] + 1 :] = 0
  return tokens


class _Stepper:
  """A jitted step whose state is donated and kept between calls."""

  def __init__(self, step_fn, *args):
    config = default.get_config()
    tx = state_lib.make_optimizer(config)
    self._state = state_lib.create_train_state(
      workload.model(),
      tx,
      (workload.NUM_LOCATIONS, workload.FEATURE_DIM),
      config.seed,
    )
    self._step = jax.jit(functools.partial(step_fn, tx=tx), donate_argnums=0)
    self._args = args

  def __call__(self) -> Any:
    self._state, metrics = self._step(self._state, *self._args)
    return jax.block_until_ready(metrics)


def bench_scst(repeats: int) -> dict[str, float]:
  """Seconds per step: SCST (greedy and mean baselines, constant reward) and
  cross-entropy on as many captions."""
  rng = np.random.default_rng(0)
  model = workload.model()
  features = jnp.asarray(workload.random_features(rng, workload.BATCH_SIZE))
  references = _references(rng)
  doc_freqs = cider.document_frequencies(references, workload.VOCAB_SIZE)
  batch = {
    'features': features,
    'references': jnp.asarray(references),
    'reference_mask': jnp.ones(references.shape[:2], bool),
  }
  scst_step = functools.partial(
    scst.scst_step, model=model, num_samples=SAMPLES, max_len=MAX_LEN
  )
  tokens = np.stack(
    [workload.random_tokens(rng, MAX_LEN + 1) for _ in range(SAMPLES)], axis=1
  ).reshape(-1, MAX_LEN + 1)
  xent_batch = {
    'features': jnp.repeat(features, SAMPLES, axis=0),
    'tokens': jnp.asarray(tokens),
  }
  constant = lambda candidates_BCT, batch, args: jnp.ones(
    candidates_BCT.shape[:2]
  )
  steps = {
    'scst_greedy': _Stepper(
      functools.partial(scst_step, baseline='greedy'), batch, doc_freqs
    ),
    'scst_mean': _Stepper(
      functools.partial(scst_step, baseline='mean'), batch, doc_freqs
    ),
    'scst_greedy_no_reward': _Stepper(
      functools.partial(scst_step, baseline='greedy', reward_fn=constant),
      batch,
      None,
    ),
    'xent': _Stepper(
      functools.partial(
        step_lib.train_step, model=model, attention_penalty=0.0
      ),
      xent_batch,
    ),
  }
  for step in steps.values():
    step()  # compiles
  seconds = harness.interleaved_medians(steps, repeats)
  return {f'{name}_s': s for name, s in seconds.items()} | {
    'captions': workload.BATCH_SIZE * SAMPLES,
    'max_len': MAX_LEN,
    'reward_share': 1
    - (seconds['scst_greedy_no_reward'] / seconds['scst_greedy']),
  }
