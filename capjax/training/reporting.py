"""Training progress: console lines, TensorBoard, a metrics log, a loss plot.

Only process 0 writes files; every process may log to the console.
"""

import json
import os
import pathlib
import time

from absl import logging

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'loss.png'
TENSORBOARD_DIR = 'tensorboard'


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


class StepTimer:
  """Steps per second since the last call, and the time left."""

  def __init__(self, step: int, total_steps: int):
    self._step, self._time = step, time.perf_counter()
    self._total = total_steps

  def rate_and_eta(self, step: int) -> tuple[float, float]:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate, (self._total - step) / max(rate, 1e-9)


class Reporter:
  """Writes scalars to TensorBoard and `metrics.jsonl`; redraws `loss.png`."""

  def __init__(self, workdir: str | os.PathLike[str], write_files: bool):
    self._workdir = pathlib.Path(workdir)
    self._write_files = write_files
    self._writer = None
    if write_files:
      # TensorFlow is here for tf.data already; its summary writer needs no
      # extra dependency.
      import tensorflow as tf  # noqa: PLC0415

      self._tf = tf
      self._writer = tf.summary.create_file_writer(
        str(self._workdir / TENSORBOARD_DIR)
      )

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self._write_files:
      return
    assert self._writer is not None  # Made in __init__ with the files.
    with self._writer.as_default(step=step):
      for name, value in metrics.items():
        self._tf.summary.scalar(f'{split}/{name}', value)
    self._writer.flush()
    with (self._workdir / METRICS_FILE).open('a') as f:
      f.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')

  def plot_losses(self) -> None:
    """Redraws train and eval loss against step from the whole metrics log."""
    if not self._write_files:
      return
    history = read_metrics(self._workdir)
    import matplotlib  # noqa: PLC0415

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, records in sorted(history.items()):
      points = [(r['step'], r['loss']) for r in records if 'loss' in r]
      if points:
        ax.plot(
          *zip(*points), label=split, marker='.' if split != 'train' else None
        )
    ax.set_xlabel('step')
    ax.set_ylabel('loss')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = self._workdir / (PLOT_FILE + '.tmp.png')
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(self._workdir / PLOT_FILE)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def read_metrics(workdir: str | os.PathLike[str]) -> dict[str, list[dict]]:
  """The metrics log by split, keeping the last record of each step.

  A resumed run repeats the steps after its checkpoint; the repeat wins.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  by_split: dict[str, dict[int, dict]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        by_split.setdefault(record['split'], {})[record['step']] = record
  return {
    split: [steps[s] for s in sorted(steps)]
    for split, steps in by_split.items()
  }


def format_scores(scores: dict[str, float]) -> str:
  """'name value | ...' for the console, each interval after its score.

  `config.best_rule` 'last_within' adds each caption metric's interval as
  '{name}_low' and '{name}_high'.
  """
  parts = []
  for name, value in scores.items():
    if name.endswith(('_low', '_high')):
      continue
    part = f'{name} {value:.4f}'
    low, high = scores.get(f'{name}_low'), scores.get(f'{name}_high')
    if low is not None and high is not None:
      part += f' [{low:.4f}, {high:.4f}]'
    parts.append(part)
  return ' | '.join(parts)


def log_train(
  step: int, total: int, metrics: dict[str, float], rate: float, eta: float
) -> None:
  logging.info(
    'step %d/%d | %s | %.2f steps/s | ETA %s',
    step,
    total,
    ' | '.join(f'{k} {v:.4f}' for k, v in metrics.items()),
    rate,
    format_duration(eta),
  )
