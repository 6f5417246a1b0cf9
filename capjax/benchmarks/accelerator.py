"""The accelerator check: capjax and the PyTorch baseline at accelerator sizes.

For a host where only JAX, flax, optax, orbax, numpy, pillow, matplotlib,
PyTorch and absl are installed: nothing here imports TensorFlow, TFDS,
ml_collections or pycocoevalcap (tests/test_accelerator_check.py runs it
with those unimportable). Rows, each timed interleaved (harness), captions/s:

- training at T = `Plan.length` and each of `Plan.train_batches`, float32
  and bfloat16: capjax's jitted step (bfloat16 compute, float32 parameters)
  against PyTorch eager and compiled (bfloat16 under `torch.autocast`);
- greedy decoding at each of `Plan.decode_batches`, capjax and PyTorch;
- beam search at `Plan.beam_batch`: capjax only, PyTorch's baseline has none;
- the data paths of training at T = `Plan.length`, each of
  `Plan.train_batches`, float32 and bfloat16, capjax only, `DATA_PATH_STEPS`
  steps per timed call, float16 grids of `DATA_PATH_ROWS` batches: the host
  path (each batch gathered in NumPy from grids in host memory, then put on
  the device two batches ahead, as config.device_data='off' does), the
  device path (the grids resident on the device, each batch gathered inside
  the jitted step from its ids: 'on') and the ceiling (the step alone, on
  batches already on the device).

And a precision row: the largest |difference| between capjax's float32
logits on the device and on the CPU, at JAX's default matmul precision and
at 'highest', and PyTorch's on the device against capjax's on the CPU. On a
GPU the default lets XLA multiply float32 in TF32, which can break the 1e-4
equivalence the tests check on the CPU.

The baselines that need TensorFlow or pycocoevalcap are listed as skipped,
with the reason. Rows run in order of importance; once `time_budget_s` is
spent, the remaining ones are skipped and say so (the budget is checked
before each row, so allow for one row more).
"""

from collections.abc import Callable
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from capjax.benchmarks import harness
from capjax.benchmarks import torch_tutorial
from capjax.benchmarks import workload
from capjax.model import decoding
from capjax.training import dispatch

BEAM_SIZE = 3
DATA_PATH_STEPS = 4
DATA_PATH_ROWS = 4
DATA_PATHS = ('host_path', 'device_path', 'ceiling')
PRECISION_ROW = 'float32 logits, max |difference| from capjax on the CPU'
DATA_PATH_ROW = 'training data path'
DTYPES = {
  'float32': (jnp.float32, torch.float32),
  'bfloat16': (jnp.bfloat16, torch.bfloat16),
}
SKIPPED = {
  "the TensorFlow tutorial's training and evaluate() "
  '(capjax.benchmarks.tutorial)': 'needs TensorFlow',
  'training on the Flickr8k caption lengths (capjax.benchmarks.training)': (
    'needs TensorFlow, capjax.configs (ml_collections) and the data'
  ),
  'input pipeline (capjax.benchmarks.pipeline)': 'needs TensorFlow',
  'feature extraction (capjax.benchmarks.extraction)': 'needs TensorFlow',
  'CIDEr-D against pycocoevalcap (capjax.benchmarks.cider)': (
    'needs pycocoevalcap'
  ),
  'SCST step (capjax.benchmarks.scst)': 'needs capjax.configs (ml_collections)',
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the check runs."""

  sizes: workload.Sizes
  length: int  # T of the training rows
  train_batches: tuple[int, ...]
  decode_batches: tuple[int, ...]
  beam_batch: int
  max_len: int  # tokens per decoded caption
  repeats: int


FULL = Plan(
  workload.TUTORIAL,
  length=32,
  train_batches=(64, 256, 1024),
  decode_batches=(1, 64, 1024),
  beam_batch=64,
  max_len=32,
  repeats=5,
)
# A dry run on a CPU in seconds: every row, tiny sizes.
QUICK = Plan(
  workload.Sizes(
    vocab_size=50, embedding_dim=16, units=32, num_locations=8, feature_dim=24
  ),
  length=8,
  train_batches=(4,),
  decode_batches=(1, 4),
  beam_batch=4,
  max_len=6,
  repeats=2,
)


def _error(e: Exception) -> str:
  return f'{type(e).__name__}: {str(e).strip()[:300]}'


def _add_torch(
  fns: dict[str, Callable[[], Any]],
  errors: dict[str, str],
  make_fn: Callable[[bool], Callable[[], Any]],
) -> None:
  """Adds PyTorch eager and compiled fns, each run once untimed; a failure
  (torch.compile's, typically) drops that fn and keeps the reason."""
  for name, compile_ in (('torch_eager', False), ('torch_compiled', True)):
    try:
      fn = make_fn(compile_)
      fn()  # the first call compiles
    # Whatever stops one PyTorch variant drops its figure, not the check.
    except Exception as e:  # noqa: BLE001
      errors[name] = _error(e)
    else:
      fns[name] = fn


def _rates(
  batch_size: int,
  fns: dict[str, Callable[[], Any]],
  errors: dict[str, str],
  repeats: int,
) -> dict[str, Any]:
  """Captions/s of each fn, and why any PyTorch variant is missing."""
  seconds = harness.interleaved_medians(fns, repeats)
  return {
    **{k: batch_size / s for k, s in seconds.items()},
    **({'errors': errors} if errors else {}),
  }


class _Check:
  """The rows of one plan; models and trainers made once per dtype and
  reused across batch sizes (each new shape still compiles)."""

  def __init__(self, plan: Plan):
    self.plan = plan
    self.device = torch_tutorial.default_device()
    self.model = workload.model(plan.sizes)
    self.params = jax.jit(self.model.init)(
      jax.random.PRNGKey(0),
      jnp.zeros((1, plan.sizes.num_locations, plan.sizes.feature_dim)),
      jnp.zeros((1, 2), jnp.int32),
    )['params']

  def inputs(self, batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
      workload.random_features(rng, batch_size, self.plan.sizes),
      workload.random_tokens(
        rng, self.plan.length, batch_size, self.plan.sizes.vocab_size
      ),
    )

  # One check per run: the caches live as long as the check, on purpose.
  @functools.cache  # noqa: B019
  def capjax_trainer(self, dtype: str) -> workload.CapjaxTrainer:
    return workload.CapjaxTrainer(self.plan.sizes, DTYPES[dtype][0])

  @functools.cache  # noqa: B019
  def torch_trainer(
    self, dtype: str, compile_: bool
  ) -> torch_tutorial.TorchTrainer:
    return torch_tutorial.TorchTrainer(
      compile_,
      sizes=self.plan.sizes,
      dtype=DTYPES[dtype][1],
      device=self.device,
    )

  @functools.cache  # noqa: B019
  def torch_decoder(self, compile_: bool) -> torch_tutorial.TorchCaptioner:
    model = torch_tutorial.from_capjax_params(self.params).to(self.device)
    if compile_:
      torch_tutorial.compile_cell(model)
    return model.eval()

  def training(self, batch_size: int, dtype: str) -> dict[str, Any]:
    features, tokens = self.inputs(batch_size)
    batch = workload.batch(features, tokens)
    trainer = self.capjax_trainer(dtype)
    fns, errors = {'capjax': lambda: trainer(batch)}, {}  # type: (dict[str, Callable[[], Any]], dict[str, str])
    features_t = torch.from_numpy(features).to(self.device)
    tokens_t = torch.from_numpy(tokens).long().to(self.device)
    _add_torch(
      fns,
      errors,
      lambda c: torch_tutorial.synchronized(
        functools.partial(self.torch_trainer(dtype, c), features_t, tokens_t),
        self.device,
      ),
    )
    return _rates(batch_size, fns, errors, self.plan.repeats)

  def data_paths(self, batch_size: int, dtype: str) -> dict[str, Any]:
    """Captions/s of training fed by each data path (module docstring)."""
    rng = np.random.default_rng(4)
    rows = DATA_PATH_ROWS * batch_size
    grids_NLD = workload.random_features(rng, rows, self.plan.sizes).astype(
      np.float16
    )
    tokens_NT = workload.random_tokens(
      rng, self.plan.length, rows, self.plan.sizes.vocab_size
    )
    ids = lambda: rng.integers(0, rows, batch_size).astype(np.int32)
    trainer = self.capjax_trainer(dtype)

    def host_batches():
      while True:
        i = ids()
        yield {'features': grids_NLD[i], 'tokens': tokens_NT[i]}

    host = dispatch.prefetch_to_device(host_batches(), jax.device_put)
    tables = jax.device_put({'features': grids_NLD, 'tokens': tokens_NT})
    fixed = jax.device_put(next(host_batches()))

    def steps(fn):
      return lambda: [fn() for _ in range(DATA_PATH_STEPS)][-1]

    seconds = harness.interleaved_medians(
      {
        'host_path': steps(lambda: trainer(next(host))),
        'device_path': steps(
          lambda: trainer.on_ids(jax.device_put(ids()), tables)
        ),
        'ceiling': steps(lambda: trainer(fixed)),
      },
      self.plan.repeats,
    )
    return {k: DATA_PATH_STEPS * batch_size / s for k, s in seconds.items()}

  def greedy(self, batch_size: int) -> dict[str, Any]:
    features, _ = self.inputs(batch_size, seed=1)
    features_j = jnp.asarray(features)
    fns = {
      'capjax': lambda: (
        decoding.greedy_captions(
          self.params, features_j, model=self.model, max_len=self.plan.max_len
        ).tokens_BT
      )
    }
    errors: dict[str, str] = {}
    features_t = torch.from_numpy(features).to(self.device)
    # .cpu() waits for the device, as the loop's stopping test does.
    _add_torch(
      fns,
      errors,
      lambda c: (
        lambda: torch_tutorial.greedy_captions(
          self.torch_decoder(c), features_t, self.plan.max_len
        ).cpu()
      ),
    )
    return _rates(batch_size, fns, errors, self.plan.repeats)

  def beam(self) -> dict[str, Any]:
    features, _ = self.inputs(self.plan.beam_batch, seed=1)
    features_j = jnp.asarray(features)
    fn = lambda: (
      decoding.beam_captions(
        self.params,
        features_j,
        model=self.model,
        max_len=self.plan.max_len,
        beam_size=BEAM_SIZE,
      ).tokens_BKT
    )
    return _rates(
      self.plan.beam_batch,
      {'capjax': fn},
      {'torch': 'the PyTorch baseline has no beam search'},
      self.plan.repeats,
    )

  def precision(self) -> dict[str, Any]:
    """Largest |difference| of float32 logits from capjax's on the CPU."""
    features, tokens = self.inputs(8, seed=2)
    variables = {'params': self.params}
    logits = lambda *args: np.asarray(jax.jit(self.model.apply)(*args)[0])
    on_device = logits(variables, features, tokens)
    with jax.default_matmul_precision('highest'):
      highest = logits(variables, features, tokens)
    # Committed to the CPU, the arguments take the computation there.
    on_cpu = logits(
      *jax.device_put((variables, features, tokens), jax.devices('cpu')[0])
    )
    torch_model = torch_tutorial.from_capjax_params(self.params).to(self.device)
    with torch.no_grad():
      torch_logits = (
        torch_model(
          torch.from_numpy(features).to(self.device),
          torch.from_numpy(tokens).long().to(self.device),
        )
        .cpu()
        .numpy()
      )
    diff = lambda x: float(np.abs(x - on_cpu).max())
    return {
      'capjax_default_precision': diff(on_device),
      'capjax_highest_precision': diff(highest),
      'torch': diff(torch_logits),
      'default_matmul_precision': str(jax.config.jax_default_matmul_precision),  # type: ignore[attr-defined]  # a real option jax's stubs lack
    }


def _rows(check: _Check) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
  """(name, fn) of each row, the most important first."""
  plan = check.plan
  rows = [(PRECISION_ROW, check.precision)]
  rows += [
    (
      f'training, T={plan.length}, batch {b}, {dtype}',
      functools.partial(check.training, b, dtype),
    )
    for dtype in DTYPES
    for b in plan.train_batches
  ]
  rows += [
    (
      f'greedy decoding, batch {b}, {plan.max_len} tokens',
      functools.partial(check.greedy, b),
    )
    for b in plan.decode_batches
  ]
  rows.append(
    (
      f'beam search, {BEAM_SIZE} beams, batch {plan.beam_batch}, '
      f'{plan.max_len} tokens',
      check.beam,
    )
  )
  rows += [
    (
      f'{DATA_PATH_ROW}, T={plan.length}, batch {b}, {dtype}',
      functools.partial(check.data_paths, b, dtype),
    )
    for dtype in DTYPES
    for b in plan.train_batches
  ]
  return rows


def run(plan: Plan, time_budget_s: float) -> dict[str, Any]:
  """Every row of the plan, within the time budget, and the settings."""
  start = time.perf_counter()
  check = _Check(plan)
  results: list[dict[str, Any]] = []
  for name, fn in _rows(check):
    row_start = time.perf_counter()
    if row_start - start > time_budget_s:
      results.append(
        {
          'row': name,
          'skipped': f'the time budget ({time_budget_s:g} s) was spent',
        }
      )
    else:
      # Compilation included: what sizes the budget.
      results.append(
        {'row': name, **fn(), 'row_s': time.perf_counter() - row_start}
      )
  return {
    'rows': results,
    'skipped': SKIPPED,
    'settings': {
      'plan': {**dataclasses.asdict(plan), 'sizes': plan.sizes._asdict()},
      'time_budget_s': time_budget_s,
      'elapsed_s': time.perf_counter() - start,
      'jax': jax.__version__,
      'jax_device': jax.devices()[0].device_kind,
      'torch': torch.__version__,
      'torch_device': str(check.device),
      'processor': harness.processor_name(),
    },
  }


def _figure(row: dict[str, Any], key: str) -> str:
  if 'skipped' in row:
    return 'skipped'
  return (
    f'{row[key]:.1f}'
    if key in row
    else 'failed'
    if key in row.get('errors', {})
    else ''
  )


def _ratio(row: dict[str, Any], key: str) -> str:
  if 'capjax' not in row or key not in row:
    return ''
  return f'{row["capjax"] / row[key]:.1f}x'


def _path_ratio(row: dict[str, Any], a: str, b: str) -> str:
  return f'{row[a] / row[b]:.2f}x' if a in row and b in row else ''


def _data_path_table(rows: list[dict[str, Any]]) -> list[str]:
  """The data path rows: captions/s of each path, and their ratios."""
  lines = [
    '| training captions/s | host path (grids in host memory, prefetched) '
    '| device path (gathered in the step) | ceiling (batch on the device) '
    '| device / host | device / ceiling |',
    '|---|---|---|---|---|---|',
  ]
  for row in rows:
    if not row['row'].startswith(DATA_PATH_ROW):
      continue
    lines.append(
      '| '
      + ' | '.join(
        [
          row['row'],
          *(_figure(row, k) for k in DATA_PATHS),
          _path_ratio(row, 'device_path', 'host_path'),
          _path_ratio(row, 'device_path', 'ceiling'),
        ]
      )
      + ' |'
    )
  return lines


def markdown(report: dict[str, Any]) -> str:
  """The table, the precision row, the skipped rows and the settings."""
  lines = [
    '| captions/s | capjax | PyTorch eager | PyTorch compiled '
    '| capjax / eager | capjax / compiled |',
    '|---|---|---|---|---|---|',
  ]
  precision = None
  for row in report['rows']:
    if row['row'] == PRECISION_ROW:
      precision = row
      continue
    if row['row'].startswith(DATA_PATH_ROW):
      continue
    lines.append(
      '| '
      + ' | '.join(
        [
          row['row'],
          _figure(row, 'capjax'),
          _figure(row, 'torch_eager'),
          _figure(row, 'torch_compiled'),
          _ratio(row, 'torch_eager'),
          _ratio(row, 'torch_compiled'),
        ]
      )
      + ' |'
    )
  lines += ['', *_data_path_table(report['rows']), '']
  if precision is None or 'skipped' in precision:
    lines.append(f'{PRECISION_ROW}: skipped.')
  else:
    lines.append(
      f'{PRECISION_ROW}: capjax on the device '
      f"{precision['capjax_default_precision']:.2e} at JAX's default matmul "
      f'precision ({precision["default_matmul_precision"]}), '
      f"{precision['capjax_highest_precision']:.2e} at 'highest'; PyTorch "
      f'on its device {precision["torch"]:.2e}.'
    )
  errors = [
    f'{row["row"]}, {name}: {error}'
    for row in report['rows']
    for name, error in row.get('errors', {}).items()
  ]
  lines += (
    ['', 'Not measured:']
    + [f'- {e}' for e in errors]
    + [f'- {name}: {reason}' for name, reason in report['skipped'].items()]
  )
  s = report['settings']
  lines += [
    '',
    f'capjax on {s["jax_device"]} (JAX {s["jax"]}), PyTorch '
    f'{s["torch"]} on {s["torch_device"]}; {s["processor"]}. Medians '
    f'of {s["plan"]["repeats"]} interleaved runs; '
    + ', '.join(f'{k}={v}' for k, v in s['plan']['sizes'].items())
    + f'; {s["elapsed_s"]:.0f} s in all.',
  ]
  return '\n'.join(lines) + '\n'
