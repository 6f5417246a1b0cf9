r"""Training: `python -m capjax.train --workdir DIR [--config FILE]`.

The default config is the offline `shapes` demo; named experiments live in
`experiments/`. Any config field can be overridden on the command line:

  python -m capjax.train --workdir /tmp/capjax-demo
  python -m capjax.train --workdir /tmp/coco \
      --config experiments/coco_inception.py --config.batch_size=128

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

import dataclasses
import functools
import pathlib
import shutil
import signal
import threading
from typing import Any, Callable, Iterator

from absl import app
from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from capjax import datasets
from capjax import evaluate
from capjax import features as features_lib
from capjax import input_pipeline
from capjax import losses
from capjax import models
from capjax import parallel
from capjax import reporting
from capjax import vocab as vocab_lib
from capjax import workdir as workdir_lib

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Raw key data: checkpoints store it as a plain uint32 array.
  rng: jax.Array


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss."""


# Held-out `shapes` images copied into the workdir for `capjax.sample` to try.
_NUM_EXAMPLE_IMAGES = 4


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """What training reads: the vocabulary and both splits' features and captions."""
  vocab: vocab_lib.Vocab
  train_store: features_lib.FeatureStore
  train_records: list[datasets.Record]
  eval_store: features_lib.FeatureStore
  eval_records: list[datasets.Record]

  @property
  def feature_shape_LD(self) -> tuple[int, int]:
    return self.train_store.num_locations, self.train_store.feature_dim


def _check_features(train: features_lib.FeatureStore,
                    evaluation: features_lib.FeatureStore,
                    saved: dict | None) -> dict:
  """The features' description, checked against eval and the workdir's model."""
  info = features_lib.describe(train)
  for name, other in [('the evaluation split', features_lib.describe(evaluation)),
                      ("this workdir's model", saved)]:
    if other is not None and other != info:
      raise ValueError(
          f'the training features (L={info["num_locations"]}, '
          f'D={info["feature_dim"]}, {info["extractor"]}) do not match '
          f'those of {name} (L={other["num_locations"]}, '
          f'D={other["feature_dim"]}, {other["extractor"]})')
  return info


def prepare_data(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 write_files: bool) -> TrainingData:
  """Loads captions and features, builds or reloads the vocabulary.

  Everything is checked here, before anything is compiled. With `write_files`
  (process 0) the vocabulary, the features' description and, for `shapes`,
  a few held-out example images are written into the workdir.
  """
  feature_dir = features_lib.resolve_feature_dir(config, str(workdir))
  train_records = datasets.load_split(config, config.train_split)
  eval_records = datasets.load_split(config, config.eval_split)
  train_store = features_lib.open_or_extract(config, config.train_split,
                                             feature_dir)
  eval_store = features_lib.open_or_extract(config, config.eval_split,
                                            feature_dir)
  features_lib.check_made_by_config(train_store, config)
  features_path = workdir / workdir_lib.FEATURES_FILE
  saved = workdir_lib.load_json(features_path) if features_path.exists() else None
  info = _check_features(train_store, eval_store, saved)

  vocab_path = workdir / workdir_lib.VOCAB_FILE
  if vocab_path.exists():
    vocab = vocab_lib.Vocab.load(vocab_path)
  else:
    vocab = vocab_lib.Vocab.build(
        (c for r in train_records for c in r.captions), config.top_k)
  if write_files:
    workdir_lib.save_json(features_path, info)
    if not vocab_path.exists():
      vocab.save(vocab_path)
    if config.dataset == 'shapes':
      _copy_example_images(config, workdir)
  return TrainingData(vocab, train_store, train_records, eval_store,
                      eval_records)


def _copy_example_images(config: ml_collections.ConfigDict,
                         workdir: pathlib.Path) -> None:
  """Copies a few `shapes` test images, never seen in training, to examples/."""
  examples = workdir / 'examples'
  if examples.exists():
    return
  examples.mkdir()
  for record in datasets.load_split(config, 'test')[:_NUM_EXAMPLE_IMAGES]:
    shutil.copy(record.image, examples / pathlib.Path(record.image).name)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with the configured schedule and optional global-norm clipping.

  The optimizer state has one layout whatever the schedule and clipping (a
  schedule even when constant, a clip even when off), so a run can resume
  with either changed, e.g. clipping switched on after a NaN.
  """
  if config.schedule == 'constant':
    learning_rate = optax.constant_schedule(config.learning_rate)
  elif config.schedule == 'warmup_cosine':
    learning_rate = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1))
  else:
    raise ValueError(f"config.schedule must be 'constant' or 'warmup_cosine', "
                     f'got {config.schedule!r}')
  clip_norm = config.grad_clip_norm or float('inf')
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                 eps=config.adam_eps))


def create_train_state(model: models.Captioner,
                       tx: optax.GradientTransformation,
                       feature_shape_LD: tuple[int, int], seed: int) -> TrainState:
  """Fresh parameters and optimizer state."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  features = jnp.zeros((1, *feature_shape_LD), jnp.float32)
  tokens = jnp.zeros((1, 2), jnp.int32)
  params = model.init(init_rng, features, tokens)['params']
  return TrainState(step=jnp.array(0, jnp.int32), params=params,
                    opt_state=tx.init(params), rng=train_rng)


def train_step(state: TrainState, batch: Batch, *, model: models.Captioner,
               tx: optax.GradientTransformation,
               attention_penalty: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on the global mean loss of a batch.

  Returns the new state and the batch's metric sums (see capjax.losses).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, attention = model.apply(
        {'params': params}, batch['features'], batch['tokens'],
        deterministic=False, rngs={'dropout': dropout_rng})
    return losses.caption_loss(logits, attention, batch['tokens'][:, 1:],
                               attention_penalty)

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(sums, objective=loss, grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *,
              model: models.Captioner) -> dict[str, jax.Array]:
  """Metric sums of a batch; all-padding rows (a short final batch) count for nothing."""
  logits, _ = model.apply({'params': params}, batch['features'], batch['tokens'])
  return losses.cross_entropy_sums(logits, batch['tokens'][:, 1:])


def _raise_if_non_finite(step_metrics: list[tuple[int, dict]],
                         last_saved: int | None, workdir: pathlib.Path) -> None:
  for step, metrics in step_metrics:
    if not np.isfinite(float(metrics['objective'])):
      where = (f'the last good checkpoint is step {last_saved} in '
               f'{workdir / workdir_lib.CHECKPOINT_DIR}'
               if last_saved is not None else 'no checkpoint was saved')
      raise NonFiniteLossError(
          f'the loss became non-finite at step {step}; {where}. Lower the '
          'learning rate or set --config.grad_clip_norm.')


def _sum_metrics(step_metrics: list[tuple[int, dict]]) -> dict[str, float]:
  keys = step_metrics[0][1].keys()
  return {k: sum(float(m[k]) for _, m in step_metrics) for k in keys}


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _agreed_stop(stop: _StopRequest, step: int, interval: int) -> bool:
  """Whether to save and stop after this step, the same on every process.

  Processes get a preemption signal at slightly different steps; one that
  stopped alone would leave the others waiting in a collective. With several
  processes they agree at each logging interval (one small all-gather);
  a lone process stops at once.
  """
  if jax.process_count() == 1:
    return stop.signal_name is not None
  if step % interval:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(
      np.array(stop.signal_name is not None))
  return bool(np.any(flags))


def evaluate_loss(params: Any, batches: Iterator[dict], p_eval_step: Callable,
                  mesh) -> dict[str, float]:
  """Loss and token accuracy over a fixed evaluation set."""
  totals = None
  for batch in batches:
    batch = {k: batch[k] for k in ('features', 'tokens')}
    sums = jax.device_get(p_eval_step(params, parallel.global_batch(batch, mesh)))
    totals = sums if totals is None else jax.tree_util.tree_map(
        np.add, totals, sums)
  if totals is None:
    raise ValueError('the evaluation split is empty')
  return losses.normalize(totals)


def _caption_metrics(params: Any, model: models.Captioner, data: TrainingData,
                     config: ml_collections.ConfigDict) -> dict[str, float]:
  """Greedy BLEU-4 and CIDEr on the first validation images, on this host.

  The replicated parameters are whole on every process, so process 0 decodes
  alone, on its own device, while the others wait at the next step.
  """
  return evaluate.caption_metrics(
      jax.device_get(params), model, data.eval_store, data.eval_records,
      data.vocab, config, config.num_caption_eval_images)


def _restore_or_init(manager: ocp.CheckpointManager, init_fn: Callable,
                     sharding) -> TrainState:
  """The latest checkpoint's state, or a fresh one."""
  latest = manager.latest_step()
  if latest is None:
    return init_fn()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(init_fn))
  logging.info('resuming from the checkpoint of step %d', latest)
  return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first config field that cannot work."""
  positive = ('batch_size', 'max_caption_len', 'log_every_steps',
              'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
              'embedding_dim', 'units', 'top_k')
  for name in positive:
    if config[name] <= 0:
      raise ValueError(f'config.{name} must be positive, got {config[name]}')
  if config.num_train_steps < 0 or config.learning_rate <= 0:
    raise ValueError('config.num_train_steps must be >= 0 and '
                     'config.learning_rate > 0')
  buckets = tuple(config.bucket_lengths)
  if not buckets or min(buckets) < 2 or max(buckets) < config.max_caption_len:
    raise ValueError(
        f'config.bucket_lengths {buckets} must be lengths >= 2 whose largest '
        f'is at least config.max_caption_len ({config.max_caption_len})')
  if not 0 <= config.dropout_rate < 1:
    raise ValueError(f'config.dropout_rate must be in [0, 1), got '
                     f'{config.dropout_rate}')


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains (resuming from the latest checkpoint) and evaluates periodically.

  Returns the final train state. Stops early, after saving a checkpoint, on
  SIGTERM or SIGINT; raises NonFiniteLossError, without saving, on a NaN or
  infinite loss, leaving the last good checkpoint as it was.
  """
  check_config(config)
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  if (workdir_path / workdir_lib.CONFIG_FILE).exists():
    workdir_lib.check_compatible(workdir_lib.load_config(workdir_path), config)
  local_batch_size = parallel.per_process_batch_size(config.batch_size)
  mesh = parallel.make_mesh()

  if is_chief:  # process 0 writes shared files first, the others then reuse them
    data = prepare_data(config, workdir_path, write_files=True)
    workdir_lib.save_config(workdir_path, config)
  parallel.sync_processes('capjax.train.prepare_data')
  if not is_chief:
    data = prepare_data(config, workdir_path, write_files=False)

  model = models.from_config(config, data.vocab.size)
  tx = make_optimizer(config)
  replicated = parallel.replicated(mesh)
  batch_sharded = parallel.batch_sharded(mesh)
  init_fn = functools.partial(create_train_state, model, tx,
                              data.feature_shape_LD, config.seed)
  manager = workdir_lib.checkpoint_manager(workdir_path, config.keep_checkpoints)
  state = _restore_or_init(manager, jax.jit(init_fn, out_shardings=replicated),
                           replicated)
  p_train_step = jax.jit(
      functools.partial(train_step, model=model, tx=tx,
                        attention_penalty=config.attention_penalty),
      in_shardings=(replicated, batch_sharded),
      out_shardings=(replicated, replicated), donate_argnums=0)
  p_eval_step = jax.jit(functools.partial(eval_step, model=model),
                        in_shardings=(replicated, batch_sharded),
                        out_shardings=replicated)
  process = dict(process_index=jax.process_index(),
                 process_count=jax.process_count())

  def eval_batches():
    return input_pipeline.eval_iterator(
        config, data.eval_store, data.eval_records, data.vocab,
        num_examples=config.num_eval_examples, **process)

  step = int(state.step)
  train_batches = input_pipeline.train_iterator(
      config, data.train_store, data.train_records, data.vocab,
      start_step=step, **process)
  reporter = reporting.Reporter(workdir_path, write_files=is_chief)
  timer = reporting.StepTimer(step, config.num_train_steps)
  pending: list[tuple[int, dict]] = []  # per-step metrics not yet looked at
  last_saved = manager.latest_step()
  logging.info('training steps %d to %d: global batch %d on %d device(s), '
               '%d local example(s) per process', step, config.num_train_steps,
               config.batch_size, jax.device_count(), local_batch_size)

  with _StopRequest() as stop:
    try:
      while step < config.num_train_steps:
        batch = parallel.global_batch(next(train_batches), mesh)
        state, metrics = p_train_step(state, batch)
        step += 1
        pending.append((step, metrics))
        last = step == config.num_train_steps
        stopping = _agreed_stop(stop, step, config.log_every_steps)
        # Reading metrics back waits for the step: do it only at intervals,
        # and always before a checkpoint, so that no NaN is ever saved.
        save = (step % config.checkpoint_every_steps == 0 or last
                or stopping)
        if step % config.log_every_steps == 0 or save:
          host_metrics = jax.device_get(pending)
          pending = []
          _raise_if_non_finite(host_metrics, last_saved, workdir_path)
          train = losses.normalize(_sum_metrics(host_metrics))
          reporting.log_train(step, config.num_train_steps, train,
                              *timer.rate_and_eta(step))
          reporter.write(step, 'train', train)
        if step % config.eval_every_steps == 0 or last:
          val = evaluate_loss(state.params, eval_batches(), p_eval_step, mesh)
          if is_chief and config.num_caption_eval_images:
            val.update(_caption_metrics(state.params, model, data, config))
          logging.info('step %d | eval %s', step, ' | '.join(
              f'{k} {v:.4f}' for k, v in val.items()))
          reporter.write(step, 'eval', val)
          reporter.plot_losses()
        if save:
          manager.save(step, args=ocp.args.StandardSave(state))
          last_saved = step
        if stopping:
          logging.warning('%s: saved the checkpoint of step %d, stopping',
                          stop.signal_name or 'another process was signalled',
                          step)
          break
    finally:
      manager.wait_until_finished()
      manager.close()
      reporter.close()
  return state


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    # e.g. `--config.carry_gru_state false`: absl reads a boolean flag alone,
    # so the value would otherwise be dropped and the flag left True.
    raise app.UsageError(
        f'unexpected arguments: {" ".join(argv[1:])} (boolean config fields '
        'take their value after "=", e.g. --config.group_by_length=false)')
  reporting.concise_console_logging()
  parallel.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  # TensorFlow only feeds data here: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
    logging.error('%s', e)
    raise SystemExit(1) from None


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _WORKDIR = flags.DEFINE_string('workdir', None,
                                 'Directory for checkpoints, metrics and the model.',
                                 required=True)
  _CONFIG = config_flags.DEFINE_config_file(
      'config', str(pathlib.Path(__file__).parent / 'configs' / 'default.py'),
      'Training configuration file.', lock_config=True)
  _COORDINATOR = flags.DEFINE_string(
      'coordinator_address', '', 'host:port of process 0, for multi-process '
      'jobs not started by SLURM or on Cloud TPU (which are detected).')
  _NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0,
                                        'Processes in a multi-process job.')
  _PROCESS_ID = flags.DEFINE_integer('process_id', -1,
                                     'This process in a multi-process job.')
  app.run(main)
