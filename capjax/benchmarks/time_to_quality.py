"""Time to quality: wall-clock seconds of training until a validation loss.

capjax and the TensorFlow tutorial's training loop (capjax.benchmarks.tutorial:
the tutorial verbatim, its decoder resetting the GRU at every step) train
from the same initial weights (the Keras model's, converted by
capjax.porting.tutorial_weights) on the same real feature grids, with Adam at
1e-3 and Keras' other defaults. Each trains the way it is built to: capjax
pads a batch to its caption-length bucket, the tutorial pads every caption
to the longest.

capjax trains in variants (VARIANTS): `capjax` is the tutorial's model on the
tutorial's batches (the same captions in the same order, step by step);
`capjax_carried_grouped` adds capjax's carried GRU state (the default) and
batches grouped by length, the same weights read by a different model.

The trainers' steps take turns, so all see the same machine load. Only the train
steps are timed, compilation and tracing included (a user waits for them
too); every `eval_every` steps both are evaluated, untimed, on the same
validation captions with the same loss: the masked cross-entropy per token.
A trainer's time to quality is its training time at the first evaluation at
or below the target.
"""

import dataclasses
import functools
import pathlib
import tempfile
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from capjax.benchmarks import tutorial
from capjax.benchmarks import workload
from capjax.configs import default
from capjax.data import input_pipeline
from capjax.model import captioner
from capjax.porting import tutorial_weights
from capjax.testing import tf_reference
from capjax.training import loop
from capjax.training import state as state_lib
from capjax.training import step as step_lib


def flickr_config(data_dir: str, feature_dir: str) -> ml_collections.ConfigDict:
  """Flickr8k-format captions and a feature store, at the tutorial's sizes."""
  config = default.get_config()
  config.dataset = 'flickr'
  config.data_dir = data_dir
  config.feature_dir = feature_dir
  config.train_split, config.eval_split = 'train', 'val'
  config.top_k = 5000
  config.embedding_dim, config.units = 256, 512
  config.carry_gru_state = False
  config.batch_size = 64
  return config


@dataclasses.dataclass
class Curve:
  """One trainer's validation loss against its training time."""

  steps: list[int] = dataclasses.field(default_factory=list)
  seconds: list[float] = dataclasses.field(default_factory=list)
  val_loss: list[float] = dataclasses.field(default_factory=list)

  def add(self, step: int, seconds: float, val_loss: float) -> None:
    self.steps.append(step)
    self.seconds.append(seconds)
    self.val_loss.append(val_loss)

  def first_at_or_below(self, target: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation <= target."""
    for step, seconds, loss in zip(self.steps, self.seconds, self.val_loss):
      if loss <= target:
        return step, seconds
    return None


class _CapjaxTrainer:
  """capjax's jitted train and eval steps on given initial parameters."""

  def __init__(self, model: captioner.Captioner, params: Any):
    tx = state_lib.adam(
      workload.LEARNING_RATE,
      b1=workload.ADAM_B1,
      b2=workload.ADAM_B2,
      eps=workload.ADAM_EPS,
      grad_clip_norm=0.0,
    )
    self._state = state_lib.TrainState(
      step=jnp.array(0, jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.PRNGKey(0),
    )
    self._train = jax.jit(
      functools.partial(
        step_lib.train_step, model=model, tx=tx, attention_penalty=0.0
      ),
      donate_argnums=0,
    )
    self._eval = jax.jit(functools.partial(step_lib.eval_step, model=model))

  def train(self, features: np.ndarray, tokens: np.ndarray) -> None:
    self._state, metrics = self._train(
      self._state, {'features': features, 'tokens': tokens}
    )
    jax.block_until_ready(metrics)

  def loss_sums(self, features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    sums = self._eval(
      self._state.params, {'features': features, 'tokens': tokens}
    )
    return np.array([float(sums['loss_sum']), float(sums['token_count'])])


def _tutorial_loss_sums(trainer: tutorial.TutorialTrainer):
  """A tf.function: (summed masked cross-entropy, real tokens) of a batch."""

  @tf.function
  def loss_sums(features, tokens):
    logits, _ = tf_reference.teacher_forced(
      trainer.encoder, trainer.decoder, features, tokens
    )
    targets = tokens[:, 1:]
    per_token = tf.keras.losses.sparse_categorical_crossentropy(
      targets, logits, from_logits=True
    )
    mask = tf.cast(targets != 0, per_token.dtype)
    return tf.stack([tf.reduce_sum(per_token * mask), tf.reduce_sum(mask)])

  return lambda features, tokens: loss_sums(features, tokens).numpy()


def _validation_loss(loss_sums, batches: list[dict[str, np.ndarray]]) -> float:
  total = sum(loss_sums(b['features'], b['tokens']) for b in batches)
  return float(total[0] / total[1])


# capjax's variants: the tutorial's model and batches, then capjax's own
# defaults on top of the same initial weights.
VARIANTS = {
  'capjax': {},
  'capjax_carried_grouped': {'carry_gru_state': True, 'group_by_length': True},
}


def bench_time_to_quality(
  config: ml_collections.ConfigDict,
  *,
  target_loss: float,
  max_seconds: float,
  eval_every: int,
  max_steps: int | None = None,
  variants: dict[str, dict] | None = None,
) -> dict[str, Any]:
  """Seconds each trainer takes to reach `target_loss` (module docstring).

  `variants` (default VARIANTS) names the capjax trainers and the config
  fields each changes. A trainer stops at the target, or without reaching
  it when its training time passes max_seconds or it has taken max_steps
  steps.
  """
  variants = VARIANTS if variants is None else variants
  with tempfile.TemporaryDirectory() as workdir:
    data = loop.prepare_data(config, pathlib.Path(workdir), write_files=False)
  train = input_pipeline.make_examples(
    data.train_store, data.train_records, data.vocab, config.max_caption_len
  )
  tutorial_length = int(train.lengths.max())
  val = input_pipeline.EvalBatches(
    input_pipeline.make_examples(
      data.eval_store, data.eval_records, data.vocab, config.max_caption_len
    ),
    batch_size=config.batch_size,
    bucket_lengths=config.bucket_lengths,
  )
  val_batches = [val.batch(i) for i in range(val.num_batches)]
  for b in val_batches:
    b['features'] = b['features'].astype(np.float32)

  num_locations, feature_dim = data.feature_shape_LD
  sizes = workload.Sizes(
    vocab_size=len(data.vocab),
    embedding_dim=config.embedding_dim,
    units=config.units,
    num_locations=num_locations,
    feature_dim=feature_dim,
  )
  tf_trainer = tutorial.TutorialTrainer(sizes, seed=config.seed)
  params = tutorial_weights.params_from_tutorial(
    tf_reference.weights(tf_trainer.encoder, tf_trainer.decoder)
  )
  tutorial_batches = input_pipeline.train_batches(
    config, data.train_store, data.train_records, data.vocab
  )

  def tutorial_train(step: int) -> float:
    batch = tutorial_batches.batch(step)
    features = tf.constant(batch['features'].astype(np.float32))
    # The tutorial pads every caption to the longest (a bucket may be
    # longer still: its tail is padding).
    tokens_BT = batch['tokens'][:, :tutorial_length]
    tokens = tf.constant(
      np.pad(tokens_BT, ((0, 0), (0, tutorial_length - tokens_BT.shape[1])))
    )
    start = time.perf_counter()
    tf_trainer(features, tokens)
    return time.perf_counter() - start

  train_fns = {'tutorial': tutorial_train}
  evaluate = {'tutorial': _tutorial_loss_sums(tf_trainer)}
  for name, overrides in variants.items():
    variant = config.copy_and_resolve_references()
    variant.update(overrides)
    model = captioner.Captioner(
      vocab_size=sizes.vocab_size,
      embedding_dim=sizes.embedding_dim,
      units=sizes.units,
      carry_gru_state=variant.carry_gru_state,
    )
    trainer = _CapjaxTrainer(model, jax.tree_util.tree_map(jnp.asarray, params))
    batches = input_pipeline.train_batches(
      variant, data.train_store, data.train_records, data.vocab
    )

    def capjax_train(step, trainer=trainer, batches=batches) -> float:
      batch = batches.batch(step)
      features = batch['features'].astype(np.float32)
      start = time.perf_counter()
      trainer.train(features, batch['tokens'])
      return time.perf_counter() - start

    train_fns[name] = capjax_train
    evaluate[name] = trainer.loss_sums

  curves = {name: Curve() for name in train_fns}
  seconds = {name: 0.0 for name in train_fns}
  for name, curve in curves.items():
    curve.add(0, 0.0, _validation_loss(evaluate[name], val_batches))
  logging.info(
    'time to quality: initial validation losses %s',
    {n: round(c.val_loss[0], 4) for n, c in curves.items()},
  )

  # The trainers take turns step by step, so that all see the same load.
  active = set(curves)
  step = 0
  while active:
    for name in sorted(active):
      seconds[name] += train_fns[name](step)
    step += 1
    out_of_budget = {
      name
      for name in active
      if seconds[name] >= max_seconds
      or (max_steps is not None and step >= max_steps)
    }
    if step % eval_every == 0 or out_of_budget:
      for name in sorted(active):
        curves[name].add(
          step, seconds[name], _validation_loss(evaluate[name], val_batches)
        )
      logging.info(
        'time to quality, step %d: %s',
        step,
        ', '.join(
          f'{n} {c.val_loss[-1]:.3f} after {c.seconds[-1]:.0f} s'
          for n, c in curves.items()
        ),
      )
    active -= out_of_budget | {
      name
      for name in active
      if curves[name].first_at_or_below(target_loss) is not None
    }

  result = {
    'target_loss': target_loss,
    'max_seconds': max_seconds,
    'eval_every': eval_every,
    'batch_size': config.batch_size,
    'train_captions': len(train),
    'val_captions': val.num_examples,
    'tutorial_length': tutorial_length,
    'feature_shape': [num_locations, feature_dim],
    'vocab_size': sizes.vocab_size,
    'variants': {name: dict(o) for name, o in variants.items()},
  }
  for name, curve in curves.items():
    reached = curve.first_at_or_below(target_loss)
    result[name] = {
      'steps_to_target': reached and reached[0],
      'seconds_to_target': reached and reached[1],
      'curve': dataclasses.asdict(curve),
    }
  return result
