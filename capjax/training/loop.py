"""The training loop: data, compiled steps, checkpoints, evaluation, reports.

`train_and_evaluate(config, workdir)` is what `python -m capjax.train` runs.
Rerunning it resumes from the latest checkpoint in the workdir.
"""

from collections.abc import Callable, Iterator
import dataclasses
import functools
import pathlib
import shutil
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from capjax import config_checks
from capjax import errors
from capjax import evaluation
from capjax import files
from capjax import workdir as workdir_lib
from capjax.data import datasets
from capjax.data import extraction
from capjax.data import feature_store
from capjax.data import input_pipeline
from capjax.data import reference_batches
from capjax.data import vocab as vocab_lib
from capjax.metrics import cider
from capjax.model import captioner
from capjax.model import losses
from capjax.training import best as best_lib
from capjax.training import checkpoints
from capjax.training import init_from
from capjax.training import parallel
from capjax.training import preemption
from capjax.training import reporting
from capjax.training import scst
from capjax.training import state as state_lib
from capjax.training import step as step_lib


class NonFiniteLossError(errors.UserError):
  """Training produced a NaN or infinite loss."""


# Held-out `shapes` images copied into the workdir for `capjax.sample` to try.
_NUM_EXAMPLE_IMAGES = 4


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """What training reads: the vocabulary and both splits' features and captions."""

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
  (process 0) the vocabulary, the features' description and, for `shapes`,
  a few held-out example images are written into the workdir.
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
    if config.dataset == 'shapes':
      _copy_example_images(config, workdir)
  return TrainingData(
    vocab, train_store, train_records, eval_store, eval_records
  )


def _copy_example_images(
  config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> None:
  """Copies a few `shapes` test images, never seen in training, to examples/."""
  examples = workdir / 'examples'
  if examples.exists():
    return
  examples.mkdir()
  for record in datasets.load_split(config, 'test')[:_NUM_EXAMPLE_IMAGES]:
    shutil.copy(record.image, examples / pathlib.Path(record.image).name)


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


def evaluate_loss(
  params: Any, batches: Iterator[dict], p_eval_step: Callable, mesh
) -> dict[str, float]:
  """Loss and token accuracy over a fixed evaluation set."""
  totals = None
  for batch in batches:
    batch = {k: batch[k] for k in ('features', 'tokens')}
    sums = jax.device_get(
      p_eval_step(params, parallel.global_batch(batch, mesh))
    )
    totals = (
      sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    )
  if totals is None:
    raise errors.UserError('the evaluation split is empty')
  return losses.normalize(totals)


def _caption_metrics(
  params: Any,
  model: captioner.Captioner,
  data: TrainingData,
  config: ml_collections.ConfigDict,
) -> dict[str, float]:
  """Greedy BLEU-4 and CIDEr on the first validation images, on this host.

  The replicated parameters are whole on every process, so process 0 decodes
  alone, on its own device, while the others wait at the next step.
  """
  return evaluation.caption_metrics(
    jax.device_get(params),
    model,
    data.eval_store,
    data.eval_records,
    data.vocab,
    config,
    config.num_caption_eval_images,
  )


def _objective(
  config: ml_collections.ConfigDict,
  data: TrainingData,
  model: captioner.Captioner,
  tx: optax.GradientTransformation,
  mesh,
  start_step: int,
  process: dict[str, int],
) -> tuple[Iterator[dict], Callable, Callable]:
  """The config.objective's batches from start_step, jitted step and means.

  Returns:
    (train batches, step(state, batch) -> (state, metric sums), the
    function that turns summed metrics into the logged means).
  """
  replicated = parallel.replicated(mesh)
  batch_sharded = parallel.batch_sharded(mesh)
  if config.objective == 'xent':
    batches = input_pipeline.train_batches(
      config, data.train_store, data.train_records, data.vocab, **process
    )
    # Batches grouped by length hold very different token counts: dividing
    # by a fixed count keeps every token's weight (losses.caption_loss).
    normalizer = (
      batches.schedule.mean_batch_tokens if config.group_by_length else None
    )
    step = jax.jit(
      functools.partial(
        step_lib.train_step,
        model=model,
        tx=tx,
        attention_penalty=config.attention_penalty,
        token_normalizer=normalizer,
      ),
      in_shardings=(replicated, batch_sharded),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
    )
    return batches.iterator(start_step), step, losses.normalize
  references = reference_batches.image_references(
    input_pipeline.make_examples(
      data.train_store, data.train_records, data.vocab, config.max_caption_len
    )
  )
  # SCST's idf comes from the training references (Rennie et al.).
  doc_freqs = jax.device_put(
    cider.document_frequencies(references.references_MRT, data.vocab.size),
    replicated,
  )
  batches = reference_batches.ImageBatches(
    references,
    batch_size=config.batch_size,
    seed=config.seed,
    cache_features=config.cache_features,
    **process,
  ).iterator(start_step)
  scst_step = jax.jit(
    scst.make_step(model, tx, config),
    in_shardings=(replicated, batch_sharded, replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  logging.info(
    'SCST on %d training images: %d samples each, %s baseline',
    len(references),
    config.scst_samples,
    config.scst_baseline,
  )
  return (
    batches,
    lambda state, batch: scst_step(state, batch, doc_freqs),
    scst.normalize,
  )


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
      moved = checkpoints.move_aside(workdir, damaged)
      logging.warning(
        'checkpoint step %d cannot be restored (%s); moved to %s',
        damaged,
        reason,
        moved,
      )
  parallel.sync_processes('capjax.train.moved_aside')
  logging.info('resuming from the checkpoint of step %d', step)
  return state


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> state_lib.TrainState:
  """Trains (resuming from the latest checkpoint) and evaluates periodically.

  Returns the final train state. Stops early, after saving a checkpoint, on
  SIGTERM or SIGINT; raises NonFiniteLossError, without saving, on a NaN or
  infinite loss, leaving the last good checkpoint as it was.
  """
  config_checks.check_config(config)
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  if (workdir_path / workdir_lib.CONFIG_FILE).exists():
    workdir_lib.check_compatible(workdir_lib.load_config(workdir_path), config)
  local_batch_size = parallel.per_process_batch_size(config.batch_size)
  mesh = parallel.make_mesh()

  def prepare(first: bool) -> TrainingData | None:
    # Process 0 writes the shared files first, the others then reuse them.
    if first != is_chief:
      return None
    prepared = prepare_data(config, workdir_path, write_files=is_chief)
    if is_chief:
      workdir_lib.save_config(workdir_path, config)
    return prepared

  # Every process takes part in both rounds.
  written = parallel.agreed('preparing the data', lambda: prepare(True))
  data = (
    parallel.agreed('preparing the data', lambda: prepare(False)) or written
  )

  model = captioner.from_config(config, data.vocab.size)
  tx = state_lib.make_optimizer(config)
  replicated = parallel.replicated(mesh)
  batch_sharded = parallel.batch_sharded(mesh)
  init_fn = functools.partial(
    state_lib.create_train_state, model, tx, data.feature_shape_LD, config.seed
  )
  abstract_params = state_lib.abstract_params(model, data.feature_shape_LD)

  def start_from_source(state: state_lib.TrainState) -> state_lib.TrainState:
    source = init_from.source(config)
    params = jax.device_put(
      init_from.params(source, abstract_params, config.init_from_step),
      replicated,
    )
    return state.replace(
      params=params,
      opt_state=jax.jit(tx.init, out_shardings=replicated)(params),
    )

  state = _restore_or_init(
    workdir_path,
    jax.jit(init_fn, out_shardings=replicated),
    replicated,
    start_from_source if config.init_from else None,
  )
  manager = checkpoints.manager(workdir_path, config.keep_checkpoints)
  best = best_lib.BestKeeper(workdir_path, config, abstract_params)
  p_eval_step = jax.jit(
    functools.partial(step_lib.eval_step, model=model),
    in_shardings=(replicated, batch_sharded),
    out_shardings=replicated,
  )
  process = dict(
    process_index=jax.process_index(), process_count=jax.process_count()
  )

  def eval_batches():
    return input_pipeline.eval_iterator(
      config,
      data.eval_store,
      data.eval_records,
      data.vocab,
      num_examples=config.num_eval_examples,
      **process,
    )

  step = int(state.step)
  train_batches, p_train_step, normalize = _objective(
    config, data, model, tx, mesh, step, process
  )
  reporter = reporting.Reporter(workdir_path, write_files=is_chief)
  timer = reporting.StepTimer(step, config.num_train_steps)
  pending: list[tuple[int, dict]] = []  # per-step metrics not yet looked at
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
        batch = parallel.global_batch(next(train_batches), mesh)
        state, metrics = p_train_step(state, batch)
        step += 1
        pending.append((step, metrics))
        last = step == config.num_train_steps
        stopping = preemption.agreed_stop(stop, step, config.log_every_steps)
        # Reading metrics back waits for the step: do it only at intervals,
        # and always before a checkpoint, so that no NaN is ever saved.
        save = step % config.checkpoint_every_steps == 0 or last or stopping
        if step % config.log_every_steps == 0 or save:
          host_metrics = jax.device_get(pending)
          pending = []
          _raise_if_non_finite(host_metrics, last_saved, workdir_path)
          train = normalize(_sum_metrics(host_metrics))
          reporting.log_train(
            step, config.num_train_steps, train, *timer.rate_and_eta(step)
          )
          reporter.write(step, 'train', train)
        if step % config.eval_every_steps == 0 or last:
          val = evaluate_loss(state.params, eval_batches(), p_eval_step, mesh)
          if config.num_caption_eval_images:
            val.update(
              parallel.agreed(
                'computing the caption metrics',
                lambda: (
                  _caption_metrics(state.params, model, data, config)
                  if is_chief
                  else {}
                ),
              )
            )
          logging.info(
            'step %d | eval %s',
            step,
            ' | '.join(f'{k} {v:.4f}' for k, v in val.items()),
          )
          reporter.write(step, 'eval', val)
          reporter.plot_losses()
          best.offer(step, val, state.params)
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
