"""Train step time on each data path, and per jitted call, through the loop's
own machinery (capjax.training.objectives and capjax.training.dispatch).

Rows, each a set of runs timed interleaved (harness), ms per train step:

- config.device_data 'off' (the host reads each batch, tf.data, and its
  transfer is prefetched) against 'on' (the batch gathered inside the step
  from the grids on the device), at the tutorial's sizes (random float16
  grids, L=64, D=2048, captions of 8 to 20 random words padded to T=24) and
  on the `shapes` demo (the default config);
- config.steps_per_dispatch 1 against 8 on the demo, both paths: what one
  jitted call per step costs where the step is small.

Each row also gives the time per step spent waiting for the next input: the
step waits where the host is slower than the step.
"""

import functools
import pathlib
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from capjax.benchmarks import harness
from capjax.benchmarks import workload
from capjax.configs import default
from capjax.data import datasets
from capjax.data import feature_store
from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.training import dispatch
from capjax.training import loop
from capjax.training import objectives
from capjax.training import parallel
from capjax.training import state as state_lib

_CAPTIONS_PER_IMAGE = 5
_TUTORIAL_LENGTH = 24


def tutorial_config() -> ml_collections.ConfigDict:
  """The tutorial's model and batch on synthetic data, T fixed."""
  config = default.get_config()
  config.embedding_dim = workload.EMBEDDING_DIM
  config.units = workload.UNITS
  config.batch_size = workload.BATCH_SIZE
  config.max_caption_len = _TUTORIAL_LENGTH
  config.bucket_lengths = (_TUTORIAL_LENGTH,)
  config.num_eval_examples = workload.BATCH_SIZE
  return config


def synthetic_data(
  directory: pathlib.Path, num_images: int, sizes: workload.Sizes
) -> loop.TrainingData:
  """Random float16 grids in a store and random captions of 8-20 words."""
  rng = np.random.default_rng(0)
  ids = [f'img{i}' for i in range(num_images)]
  store = feature_store.write_feature_store(
    directory / 'store',
    workload.random_features(rng, num_images, sizes).astype(np.float16),
    ids,
    {'name': 'random'},
  )
  words = [f'word{i}' for i in range(sizes.vocab_size)]
  records = [
    datasets.Record(
      i,
      None,
      tuple(
        ' '.join(rng.choice(words, size=rng.integers(8, 21)))
        for _ in range(_CAPTIONS_PER_IMAGE)
      ),
    )
    for i in ids
  ]
  vocab = vocab_lib.Vocab.build(
    (c for r in records for c in r.captions), sizes.vocab_size - 4
  )
  return loop.TrainingData(vocab, store, records, store, records)


class _Run:
  """A training run without bookkeeping: `run(n)` takes n more steps."""

  def __init__(self, config, data: loop.TrainingData, mesh):
    model = captioner.from_config(config, data.vocab.size)
    tx = state_lib.make_optimizer(config)
    objective, _ = objectives.build(
      config, data, model, tx, mesh, dict(process_index=0, process_count=1)
    )
    self.choice = objective.choice
    self.state = jax.jit(
      functools.partial(
        state_lib.create_train_state,
        model,
        tx,
        data.feature_shape_LD,
        config.seed,
      ),
      out_shardings=parallel.replicated(mesh),
    )()
    self.dispatcher = dispatch.Dispatcher(
      objective, mesh, 0, 2**40, config.steps_per_dispatch
    )
    self.step = 0
    self.waits: list[float] = []  # input wait per step, of each call

  def run(self, num_steps: int) -> Any:
    waited = self.dispatcher.input_wait_s
    stop = self.step + num_steps
    while self.step < stop:
      self.state, self.step, _ = self.dispatcher.run(self.state, self.step)
    self.waits.append((self.dispatcher.input_wait_s - waited) / num_steps)
    return self.state.params


def bench_row(
  config: ml_collections.ConfigDict,
  data: loop.TrainingData,
  variants: dict[str, dict[str, Any]],
  steps_per_call: int,
  repeats: int,
) -> dict[str, dict[str, Any]]:
  """ms per step and input wait per step of each variant (config fields)."""
  mesh = parallel.make_mesh()
  runs = {}
  for name, fields in variants.items():
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.update(fields)
    runs[name] = _Run(variant, data, mesh)
  seconds = harness.interleaved_medians(
    {
      name: functools.partial(run.run, steps_per_call)
      for name, run in runs.items()
    },
    repeats,
  )
  return {
    name: {
      'step_ms': 1e3 * seconds[name] / steps_per_call,
      # The first call compiled.
      'input_wait_ms': 1e3 * statistics.median(run.waits[1:]),
      'path': (f'device ({run.choice.layout})' if run.choice.on else 'host'),
    }
    for name, run in runs.items()
  }


def bench_data_paths(
  tmp: pathlib.Path, repeats: int, quick: bool = False
) -> dict[str, Any]:
  """Every row of the module docstring."""
  start = time.perf_counter()
  tutorial = tutorial_config()
  sizes = workload.TUTORIAL
  if quick:
    sizes = sizes._replace(feature_dim=64)
  tutorial_data = synthetic_data(tmp / 'tutorial', 256, sizes)
  demo = default.get_config()
  demo.data_dir = str(tmp / 'shapes')
  if quick:
    demo.shapes.num_train, demo.shapes.num_val = 400, 64
  with_workdir = tmp / 'workdir'
  with_workdir.mkdir()
  demo_data = loop.prepare_data(demo, with_workdir, write_files=False)
  on_off = {'host': {'device_data': 'off'}, 'device': {'device_data': 'on'}}
  report: dict[str, Any] = {
    'tutorial_sizes': bench_row(tutorial, tutorial_data, on_off, 2, repeats),
    'demo': bench_row(demo, demo_data, on_off, 8, repeats),
    'demo_steps_per_dispatch': bench_row(
      demo,
      demo_data,
      {
        f'{path}, k={k}': dict(on_off[path], steps_per_dispatch=k)
        for path in on_off
        for k in (1, 8)
      },
      8,
      repeats,
    ),
  }
  report['settings'] = {
    'repeats': repeats,
    'quick': quick,
    'tutorial_sizes': sizes._asdict(),
    'tutorial_length': _TUTORIAL_LENGTH,
    'demo': {
      'embedding_dim': demo.embedding_dim,
      'units': demo.units,
      'batch_size': demo.batch_size,
      'feature_shape_LD': demo_data.feature_shape_LD,
    },
    'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
    'processor': harness.processor_name(),
    'elapsed_s': time.perf_counter() - start,
  }
  return report


def markdown(report: dict[str, Any]) -> str:
  """One table: each row's variants, ms per step, input wait, ratio."""
  lines = [
    '| row | variant | data path | ms per step | of which waiting for '
    'input | speed-up over the first variant |',
    '|---|---|---|---|---|---|',
  ]
  titles = {
    'tutorial_sizes': "tutorial's sizes (B=64, T=24, L=64, D=2048)",
    'demo': 'shapes demo (default config)',
    'demo_steps_per_dispatch': 'shapes demo, steps_per_dispatch',
  }
  for key, title in titles.items():
    row = report[key]
    first = next(iter(row.values()))['step_ms']
    for name, r in row.items():
      lines.append(
        f'| {title} | {name} | {r["path"]} | {r["step_ms"]:.2f} | '
        f'{r["input_wait_ms"]:.2f} | {first / r["step_ms"]:.2f}x |'
      )
  s = report['settings']
  lines += [
    '',
    f'{s["devices"]}; {s["processor"]}. Medians of {s["repeats"]} '
    f'interleaved calls; {s["elapsed_s"]:.0f} s in all.',
  ]
  return '\n'.join(lines) + '\n'
