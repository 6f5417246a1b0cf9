"""Keeping the best checkpoint while training.

On small data a model overfits long before `num_train_steps`, so each
periodic evaluation whose score under `config.best_metric` beats every
earlier one saves the parameters as the workdir's best checkpoint
(capjax.training.checkpoints.best_manager), which programs load by default.

The record (step and score) lives on disk with the parameters, so a resumed
run continues from it. A tie keeps the earlier step: a resume repeats the
evaluations after its checkpoint, and an exact resume scores them exactly
as before, so it ends with the best step and score of an uninterrupted run.

`config.best_rule` 'last_within' keeps instead the newest evaluation whose
score lies inside the 95% bootstrap interval (over the validation images)
of the highest score so far: on a small validation set a later step that
scores a little lower is not measurably worse, and it has trained longer.
The highest score and its interval's lower end are kept beside the
checkpoint (TOP_FILE), so a resumed run keeps applying the rule.
"""

from collections.abc import Sequence
import math
import pathlib
from typing import Any, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from capjax import config_checks
from capjax import files
from capjax.training import checkpoints
from capjax.training import damage
from capjax.training import parallel

TOP_FILE = 'best_rule_top.json'


class Top(NamedTuple):
  """The highest validation score so far and its interval's lower end."""

  step: int
  score: float
  low: float


def keeps_within(score: float, top: Top | None) -> tuple[bool, bool]:
  """'last_within': (keep this evaluation, it is the new top).

  A higher score than the top's is the new top; a score at or above the
  top's lower end is kept as the newest within its interval.
  """
  if not np.isfinite(score):
    return False, False
  if top is None or score > top.score:
    return True, True
  return score >= top.low, False


def steps_kept(evaluations: Sequence[tuple[int, float, float]]) -> dict:
  """The step each `config.best_rule` keeps, replayed after the fact.

  For studies of the rule (scripts/scst_cv.py) on a run whose checkpoints
  were all kept. Args: (step, score, interval's lower end) of each
  evaluation in order, for a metric where higher is better. Returns
  {'best': step, 'last_within': step}, None where no score is finite.
  """
  kept: dict = {'best': None, 'last_within': None}
  best_score, top = -math.inf, None
  for step, score, low in evaluations:
    if np.isfinite(score) and score > best_score:
      kept['best'], best_score = step, score
    keep, is_top = keeps_within(score, top)
    if is_top:
      top = Top(step, score, low)
    if keep:
      kept['last_within'] = step
  return kept


def _read_top(workdir: pathlib.Path) -> Top | None:
  path = workdir / TOP_FILE
  if not path.is_file():
    return None
  return Top(**files.read_json(path))


def metric_of(config: ml_collections.ConfigDict) -> str:
  """The validation metric that chooses the best checkpoint.

  CIDEr and BLEU-4 come from the periodic caption evaluation. With it off
  (num_caption_eval_images 0) the validation loss chooses instead, rather
  than the config being refused: turning it off is how quick runs save
  time, and each would otherwise have to name a metric as well.
  """
  if config.best_metric != 'loss' and not config.num_caption_eval_images:
    return 'loss'
  return config.best_metric


def improves(
  score: float, loss: float, metric: str, record: checkpoints.Checkpoint | None
) -> bool:
  """Whether an evaluation's score beats the best checkpoint's, strictly.

  A non-finite validation loss (a diverged model) never does.
  """
  if not (np.isfinite(score) and np.isfinite(loss)):
    return False
  if record is None:
    return True
  assert record.score is not None  # Set for every best checkpoint.
  if config_checks.BEST_METRICS[metric] == 'max':
    return score > record.score
  return score < record.score


def _checked_record(
  workdir: pathlib.Path, expected: Any
) -> checkpoints.Checkpoint | None:
  """The best checkpoint, read whole once; a damaged one is moved aside.

  Every process reads it and reaches the same verdict; process 0 moves it.
  """
  try:
    return checkpoints.check_best(workdir, expected)
  except checkpoints.DamagedCheckpointError as e:
    failure = e
  parallel.sync_processes('capjax.train.best_checked')
  if jax.process_index() == 0:
    moved = damage.move_aside(workdir, checkpoints.best_directory(workdir))
    logging.warning(
      '%s; moved to %s, the next evaluation saves a new one', failure, moved
    )
  parallel.sync_processes('capjax.train.best_moved_aside')
  return None


class BestKeeper:
  """Saves the parameters of each evaluation that beats the best so far."""

  def __init__(
    self,
    workdir: pathlib.Path,
    config: ml_collections.ConfigDict,
    expected_params: Any,
  ):
    """Reads the workdir's best checkpoint (see `_checked_record`).

    Args:
      workdir: the workdir.
      config: the training config.
      expected_params: the parameters' abstract tree, to check the best
        checkpoint against.
    """
    self._workdir = workdir
    self._metric = metric_of(config)
    if self._metric != config.best_metric:
      logging.info(
        'the caption evaluation is off '
        '(config.num_caption_eval_images 0): the validation loss '
        'chooses the best checkpoint, not %s',
        config.best_metric,
      )
    record = _checked_record(workdir, expected_params)
    if record is not None and record.metric != self._metric:
      logging.info(
        '%s was chosen by %s; the next evaluation replaces it, '
        'as config.best_metric is %s now',
        record.describe(),
        record.metric,
        self._metric,
      )
      record = None
    elif record is not None:
      logging.info('the best so far: %s', record.describe())
    self._record = record
    self._rule = config.best_rule
    self._top = _read_top(workdir) if self._rule == 'last_within' else None
    # Creating the manager creates the directory (process 0): a process
    # still reading it above could see it half made and call it damaged.
    parallel.sync_processes('capjax.train.best_read')
    self._manager = checkpoints.best_manager(
      workdir, self._metric, config_checks.BEST_METRICS[self._metric]
    )

  def offer(self, step: int, scores: dict[str, float], params: Any) -> None:
    """Saves `params` as the best checkpoint if `scores` beat the record.

    The save is waited for: a checkpoint of the train state saved after
    this evaluation must never be on disk without the record it set, as a
    resume from that checkpoint does not repeat the evaluation.
    """
    # Only process 0 computes the caption metrics; every process must take
    # the same decision, as each takes part in the save.
    score = parallel.from_process_0(scores.get(self._metric, math.nan))
    if self._rule == 'last_within':
      low = parallel.from_process_0(scores.get(f'{self._metric}_low', math.nan))
      keep, is_top = keeps_within(
        score if np.isfinite(scores['loss']) else math.nan, self._top
      )
      if not keep:
        return
      if is_top:
        self._top = Top(step, score, low)
      # Orbax keeps the highest-scoring step of its manager, and the step
      # kept here may score lower than the one it replaces: that one goes
      # first (a stop in between leaves no best checkpoint until the next
      # evaluation).
      for older in self._manager.all_steps():
        self._manager.delete(older)
    elif not improves(score, scores['loss'], self._metric, self._record):
      return
    # Orbax saves no step at or below its newest. A record of a later step
    # comes from a run this one does not repeat exactly (it resumed under
    # another config) or was scored by another metric; the better score
    # replaces it, so it goes first (a stop in between leaves no best
    # checkpoint until the next evaluation).
    for stale in self._manager.all_steps():
      if stale >= step:
        self._manager.delete(stale)
    # The parameters alone: what loading a model or starting another run
    # from it needs; Adam's moments would triple the size.
    self._manager.save(
      step,
      args=ocp.args.StandardSave({'params': params}),
      metrics={self._metric: score},
    )
    self._manager.wait_until_finished()
    if self._top is not None and jax.process_index() == 0:
      files.write_json_atomic(self._workdir / TOP_FILE, self._top._asdict())
    self._record = checkpoints.Checkpoint(
      self._workdir, step, 'best', self._metric, score
    )
    logging.info('step %d: saved as %s', step, self._record.describe())

  def close(self) -> None:
    self._manager.close()
