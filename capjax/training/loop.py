"""The training loop: data, compiled steps, checkpoints, evaluation, reports.

`train_and_evaluate(config, workdir)` is what `python -m capjax.train` runs.
Rerunning it resumes from the latest checkpoint in the workdir.
"""

from collections.abc import Callable
import dataclasses
import functools
import pathlib

from absl import logging
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from capjax import config_checks
from capjax import errors
from capjax import files
from capjax import workdir as workdir_lib
from capjax.data import datasets
from capjax.data import extraction
from capjax.data import feature_store
from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.training import best as best_lib
from capjax.training import checkpoints
from capjax.training import damage
from capjax.training import dispatch
from capjax.training import init_from
from capjax.training import objectives
from capjax.training import parallel
from capjax.training import preemption
from capjax.training import reporting
from capjax.training import state as state_lib
from capjax.training import validation


class NonFiniteLossError(errors.UserError):
  """Training produced a NaN or infinite loss."""


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """What training reads: the vocabulary, both splits' features and captions."""

  vocab: vocab_lib.Vocab
  train_store: feature_store.FeatureStore
  train_records: list[datasets.Record]
  eval_store: feature_store.FeatureStore
  eval_records: list[datasets.Record]

  @property
  def feature_shape_LD(self) -> tuple[int, int]:
    return self.train_store.num_locations, self.train_store.feature_dim


def prepare_data(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, write_files: bool
) -> TrainingData:
  """Loads captions and features, builds or reloads the vocabulary.

  Everything is checked here, before anything is compiled, config.init_from
  included (whose vocabulary a new workdir takes). With `write_files`
  (process 0) the vocabulary, the features' description and, where it has
  the data set's example images are written into the workdir.
  """
  feature_dir = feature_store.resolve_feature_dir(config, workdir)
  train_records = datasets.load_split(config, config.train_split)
  eval_records = datasets.load_split(config, config.eval_split)
  train_store = extraction.open_or_extract(
    config, config.train_split, feature_dir
  )
  eval_store = extraction.open_or_extract(
    config, config.eval_split, feature_dir
  )
  extraction.check_made_by_config(train_store, config)
  info = train_store.describe()
  feature_store.require_same_features(
    eval_store.describe(),
    info,
    expected_what='the evaluation split',
    got_what='the training features',
  )
  features_path = workdir / workdir_lib.FEATURES_FILE
  if features_path.exists():
    feature_store.require_same_features(
      files.read_json(features_path),
      info,
      expected_what="this workdir's model",
      got_what='the training features',
    )

  vocab_path = workdir / workdir_lib.VOCAB_FILE
  # Only a new workdir reads init_from: its vocabulary is then copied here,
  # so that a resumed run no longer needs the source.
  source = None if vocab_path.exists() else init_from.source(config)
  if vocab_path.exists():
    vocab = vocab_lib.Vocab.load(vocab_path)
  elif source is not None:
    init_from.check_features(source, info)
    vocab = init_from.vocab(source)
  else:
    vocab = vocab_lib.Vocab.build(
      (c for r in train_records for c in r.captions), config.top_k
    )
  if write_files:
    workdir_lib.save_json(features_path, info)
    if not vocab_path.exists():
      vocab.save(vocab_path)
    if not (workdir / workdir_lib.EXAMPLES_DIR).exists():
      workdir_lib.save_examples(workdir, datasets.example_images(config))
  return TrainingData(
    vocab, train_store, train_records, eval_store, eval_records
  )


def _raise_if_non_finite(
  step_metrics: list[tuple[int, dict]],
  last_saved: int | None,
  workdir: pathlib.Path,
) -> None:
  for step, metrics in step_metrics:
    if not np.isfinite(float(metrics['objective'])):
      where = (
        f'the last good checkpoint is step {last_saved} in '
        f'{workdir / workdir_lib.CHECKPOINT_DIR}'
        if last_saved is not None
        else 'no checkpoint was saved'
      )
      raise NonFiniteLossError(
        f'the loss became non-finite at step {step}; {where}. Lower the '
        'learning rate or set --config.grad_clip_norm.'
      )


def _sum_metrics(step_metrics: list[tuple[int, dict]]) -> dict[str, float]:
  keys = step_metrics[0][1].keys()
  return {k: sum(float(m[k]) for _, m in step_metrics) for k in keys}


def _restore_or_init(
  workdir: pathlib.Path,
  init_fn: Callable,
  sharding,
  start_fn: Callable | None = None,
) -> state_lib.TrainState:
  """The newest checkpoint that restores completely, or a fresh state.

  A fresh state is `start_fn(init_fn())` when start_fn is given (it puts in
  config.init_from's parameters).

  Newer steps that cannot be restored are moved aside, by process 0 once
  every process has chosen the same step (the choice is deterministic).
  """
  restored = checkpoints.restore_newest(
    workdir, checkpoints.abstract_tree(jax.eval_shape(init_fn), sharding)
  )
  if restored is None:
    return start_fn(init_fn()) if start_fn else init_fn()
  step, state, skipped = restored
  parallel.sync_processes('capjax.train.restored')
  for damaged, reason in skipped:
    if jax.process_index() == 0:
      moved = damage.move_aside(
        workdir, checkpoints.directory(workdir) / str(damaged)
      )
      logging.warning(
        'checkpoint step %d cannot be restored (%s); moved to %s',
        damaged,
        reason,
        moved,
      )
  parallel.sync_processes('capjax.train.moved_aside')
  logging.info('resuming from the checkpoint of step %d', step)
  return state


def _prepare_on_every_process(
  config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> TrainingData:
  """prepare_data on every process: process 0 first, as it writes the files."""
  is_chief = jax.process_index() == 0

  def prepare(first: bool) -> TrainingData | None:
    # Process 0 writes the shared files first, the others then reuse them.
    if first != is_chief:
      return None
    prepared = prepare_data(config, workdir, write_files=is_chief)
    if is_chief:
      workdir_lib.save_config(workdir, config)
    return prepared

  # Every process takes part in both rounds.
  written = parallel.agreed('preparing the data', lambda: prepare(True))
  prepared = (
    parallel.agreed('preparing the data', lambda: prepare(False)) or written
  )
  # Each process prepares in one of the two rounds.
  assert prepared is not None
  return prepared


def _initial_state(
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  model: captioner.Captioner,
  tx: optax.GradientTransformation,
  feature_shape_LD: tuple[int, int],
  mesh,
) -> state_lib.TrainState:
  """The newest checkpoint's state, else a fresh one (init_from's model)."""
  replicated = parallel.replicated(mesh)
  init_fn = functools.partial(
    state_lib.create_train_state, model, tx, feature_shape_LD, config.seed
  )

  def start_from_source(state: state_lib.TrainState) -> state_lib.TrainState:
    source = init_from.source(config)
    assert source is not None  # Used only when config.init_from is set.
    abstract_params = state_lib.abstract_params(model, feature_shape_LD)
    params = jax.device_put(
      init_from.params(source, abstract_params, config.init_from_step),
      replicated,
    )
    return state.replace(
      params=params,
      opt_state=jax.jit(tx.init, out_shardings=replicated)(params),
    )

  return _restore_or_init(
    workdir,
    jax.jit(init_fn, out_shardings=replicated),
    replicated,
    start_from_source if config.init_from else None,
  )


class _TrainMetrics:
  """The train step's metrics: kept on the device, read back at intervals.

  Reading metrics back waits for the step, so it happens only when logging
  and before every checkpoint, so that no NaN is ever saved.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    normalize: Callable,
    reporter: reporting.Reporter,
    start_step: int,
  ):
    self._total_steps = config.num_train_steps
    self._workdir = workdir
    self._normalize = normalize
    self._reporter = reporter
    self._timer = reporting.StepTimer(start_step, config.num_train_steps)
    self._pending: list = []  # dispatch.Dispatcher.run's entries

  def extend(self, entries: list) -> None:
    """Adds the entries of `dispatch.Dispatcher.run`, still on the device."""
    self._pending += entries

  def log(self, step: int, last_saved: int | None) -> None:
    """Logs the mean since the last call; raises on a non-finite loss."""
    host_metrics = dispatch.per_step(jax.device_get(self._pending))
    self._pending = []
    _raise_if_non_finite(host_metrics, last_saved, self._workdir)
    train = self._normalize(_sum_metrics(host_metrics))
    reporting.log_train(
      step, self._total_steps, train, *self._timer.rate_and_eta(step)
    )
    self._reporter.write(step, 'train', train)


def _report_eval(
  reporter: reporting.Reporter, step: int, scores: dict[str, float]
) -> None:
  logging.info('step %d | eval %s', step, reporting.format_scores(scores))
  reporter.write(step, 'eval', scores)
  reporter.plot_losses()


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> state_lib.TrainState:
  """Trains (resuming from the latest checkpoint) and evaluates periodically.

  Returns the final train state. Stops early, after saving a checkpoint, on
  SIGTERM or SIGINT; raises NonFiniteLossError, without saving, on a NaN or
  infinite loss, leaving the last good checkpoint as it was.
  """
  workdir_path = pathlib.Path(workdir)
  # A started run reads neither its init_from source nor the extractor's
  # weights again: they may be gone (the source's copy, a weights download).
  started = checkpoints.directory(workdir_path).is_dir() and any(
    checkpoints.directory(workdir_path).iterdir()
  )
  config_checks.check_config(config, paths=not started)
  workdir_path.mkdir(parents=True, exist_ok=True)
  if (workdir_path / workdir_lib.CONFIG_FILE).exists():
    workdir_lib.check_compatible(workdir_lib.load_config(workdir_path), config)
  local_batch_size = parallel.per_process_batch_size(config.batch_size)
  mesh = parallel.make_mesh()
  data = _prepare_on_every_process(config, workdir_path)
  model = captioner.from_config(config, data.vocab.size)
  tx = state_lib.make_optimizer(config)
  # The data path (config.device_data): chosen, and the data put on the
  # devices, before anything is compiled.
  objective, device_loss = objectives.build(
    config,
    data,
    model,
    tx,
    mesh,
    dict(process_index=jax.process_index(), process_count=jax.process_count()),
  )
  state = _initial_state(
    config, workdir_path, model, tx, data.feature_shape_LD, mesh
  )
  step = int(state.step)
  # Train steps run per jitted call (config.steps_per_dispatch).
  dispatcher = dispatch.Dispatcher(
    objective, mesh, step, config.num_train_steps, config.steps_per_dispatch
  )
  evaluate = validation.Validator(
    config,
    model,
    mesh,
    data.vocab,
    data.eval_store,
    data.eval_records,
    device_loss=device_loss,
  )
  manager = checkpoints.manager(workdir_path, config.keep_checkpoints)
  best = best_lib.BestKeeper(
    workdir_path,
    config,
    state_lib.abstract_params(model, data.feature_shape_LD),
  )
  reporter = reporting.Reporter(
    workdir_path, write_files=jax.process_index() == 0
  )
  train_metrics = _TrainMetrics(
    config, workdir_path, objective.normalize, reporter, step
  )
  last_saved = manager.latest_step()
  logging.info(
    'training steps %d to %d: global batch %d on %d device(s), '
    '%d local example(s) per process',
    step,
    config.num_train_steps,
    config.batch_size,
    jax.device_count(),
    local_batch_size,
  )

  with preemption.StopRequest() as stop:
    try:
      while step < config.num_train_steps:
        state, step, entries = dispatcher.run(state, step)
        train_metrics.extend(entries)
        last = step == config.num_train_steps
        stopping = preemption.agreed_stop(stop, step, config.log_every_steps)
        save = step % config.checkpoint_every_steps == 0 or last or stopping
        if step % config.log_every_steps == 0 or save:
          train_metrics.log(step, last_saved)
        if step % config.eval_every_steps == 0 or last:
          scores = evaluate(state.params)
          _report_eval(reporter, step, scores)
          best.offer(step, scores, state.params)
        if save:
          manager.save(step, args=ocp.args.StandardSave(state))
          last_saved = step
        if stopping:
          logging.warning(
            '%s: saved the checkpoint of step %d, stopping',
            stop.signal_name or 'another process was signalled',
            step,
          )
          break
    finally:
      manager.wait_until_finished()
      manager.close()
      best.close()
      reporter.close()
  return state
