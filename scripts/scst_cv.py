r"""Cross-validates SCST recipes on Flickr8k-format data with given features.

  python scripts/scst_cv.py --data_dir DATA --features FEATURES \
      --test_list Flickr_8k.testImages.txt --out_dir CV [--greedy --mean ...]

DATA holds a Flickr token file (e.g. `captions.txt`) of N images; FEATURES
holds `features.npy` (N, L, D) and `ids.json` (the file names), as
`python -m capjax.features --from_numpy` reads them. The images of
--test_list among them are the test set; the others are split into --folds
folds (seeded), each in turn the validation set (and stage 1's model
selection) with the rest for training.

For every fold, stage 1 trains experiments/flickr8k_inception.py's model
with cross-entropy, keeping every evaluated checkpoint. Its best
validation-CIDEr step (`config.best_rule` 'best') is its result; the step
'last_within' would keep is scored against it on the test set, which is
what the rule's default rests on. Then each chosen variant fine-tunes the
best step with SCST (experiments/flickr8k_scst.py) and is scored on the
test set against it with `capjax.evaluate --compare` (paired bootstrap
intervals). One flag per variant (VARIANTS below). The --first_pass
variants run first, fold by fold, then the others, fold by fold; a variant
is skipped on the later folds once it has lost test CIDEr to its stage 1 on
--stop_after_losses folds.

Everything lives under --out_dir: folds/ (data directories and feature
stores), runs/ (workdirs) and results/ (one JSON per finished run, with its
CPU seconds). A finished run is skipped on rerun; an interrupted one resumes
from its last checkpoint. results/summary.md is the variant x fold table.
"""

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np

_REPO = pathlib.Path(__file__).resolve().parent.parent
_STAGE_1 = _REPO / 'experiments' / 'flickr8k_inception.py'
_STAGE_2 = _REPO / 'experiments' / 'flickr8k_scst.py'


@dataclasses.dataclass(frozen=True)
class Variant:
  """An SCST recipe: config overrides of experiments/flickr8k_scst.py."""

  help: str
  overrides: dict
  # Start from stage 1's last checkpoint rather than its best (and still
  # be compared with its best).
  later_start: bool = False
  # Captions a step per image of --scst_batch_size: a cross-entropy run's
  # batch counts captions, an SCST run's images.
  captions_per_image: int = 1


# Cheapest first: the mean baseline skips the greedy decode.
VARIANTS = {
  'mean': Variant(
    'mean-of-other-samples baseline, lr 5e-5',
    {'scst_baseline': 'mean', 'learning_rate': 5e-5},
  ),
  'greedy': Variant(
    'greedy baseline, lr 5e-5 (the experiment config before this study)',
    {'scst_baseline': 'greedy', 'learning_rate': 5e-5},
  ),
  'lr2e5': Variant(
    'greedy baseline, lr 2e-5',
    {'scst_baseline': 'greedy', 'learning_rate': 2e-5},
  ),
  'lr1e4': Variant(
    'greedy baseline, lr 1e-4',
    {'scst_baseline': 'greedy', 'learning_rate': 1e-4},
  ),
  'later': Variant(
    "greedy baseline, lr 5e-5, from stage 1's last checkpoint",
    {'scst_baseline': 'greedy', 'learning_rate': 5e-5},
    later_start=True,
  ),
  'mixed_xent': Variant(
    'greedy baseline, lr 5e-5, plus 0.2 x cross-entropy on the references',
    {
      'scst_baseline': 'greedy',
      'learning_rate': 5e-5,
      'scst_xent_weight': 0.2,
    },
  ),
  # Whether the reward adds anything to what more cross-entropy steps on
  # the same images do: stage 1 may simply not have converged.
  'xent_only': Variant(
    'control, no SCST: cross-entropy alone, lr 5e-5, on the 5 references '
    'of each image (what mixed_xent sees besides its samples)',
    {'objective': 'xent', 'learning_rate': 5e-5},
    captions_per_image=5,
  ),
}

_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, 'Flickr-format caption directory.', required=True
)
_FEATURES = flags.DEFINE_string(
  'features',
  None,
  'Directory of features.npy and ids.json.',
  required=True,
)
_TEST_LIST = flags.DEFINE_string(
  'test_list', None, 'The test images, one file name a line.', required=True
)
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Output root.', required=True)
_FOLDS = flags.DEFINE_integer('folds', 4, 'Cross-validation folds.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the fold split.')
_STAGE_1_STEPS = flags.DEFINE_integer('stage1_steps', 300, 'Stage 1 steps.')
_STAGE_1_EVAL = flags.DEFINE_integer(
  'stage1_eval_every', 100, 'Stage 1 evaluation (and checkpoint) interval.'
)
_SCST_STEPS = flags.DEFINE_integer('scst_steps', 50, 'SCST steps.')
_SCST_EVAL = flags.DEFINE_integer(
  'scst_eval_every', 25, 'SCST evaluation (and checkpoint) interval.'
)
_EMBEDDING_DIM = flags.DEFINE_integer(
  'embedding_dim', 256, "The model's embedding size (the experiment's: 256)."
)
_UNITS = flags.DEFINE_integer(
  'units', 512, "The model's GRU size (the experiment's: 512)."
)
_SCST_BATCH = flags.DEFINE_integer('scst_batch_size', 32, 'SCST images a step.')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap resamples.')
_STOP_AFTER = flags.DEFINE_integer(
  'stop_after_losses',
  2,
  'Stop a variant after it loses test CIDEr on this many folds.',
)
_FIRST_PASS = flags.DEFINE_list(
  'first_pass',
  ['greedy', 'mean'],
  'Variants run on every fold before the others start.',
)
_ALL = flags.DEFINE_bool('all', False, 'Run every variant.')
_VARIANT_FLAGS = {
  name: flags.DEFINE_bool(name, False, v.help) for name, v in VARIANTS.items()
}


def _log(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


def _child_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _run(command: list[str], log_path: pathlib.Path) -> None:
  """Runs a capjax program, its output appended to log_path."""
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  with log_path.open('a') as log:
    log.write(f'$ {" ".join(command)}\n')
    log.flush()
    done = subprocess.run(
      command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
    )
  if done.returncode:
    raise RuntimeError(f'exit {done.returncode}: {" ".join(command)}')


def _fold_ids(names: list[str], test: set[str]) -> list[list[str]]:
  """The non-test names in --folds seeded folds of (nearly) equal size."""
  rest = sorted(n for n in names if n not in test)
  order = np.random.default_rng(_SEED.value).permutation(len(rest))
  return [
    sorted(rest[i] for i in part)
    for part in np.array_split(order, _FOLDS.value)
  ]


def prepare_folds(out: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """Each fold's (data directory, feature directory), made once."""
  from capjax.data import feature_store  # noqa: PLC0415

  features_path = pathlib.Path(_FEATURES.value) / 'features.npy'
  names = json.loads((pathlib.Path(_FEATURES.value) / 'ids.json').read_text())
  listed = pathlib.Path(_TEST_LIST.value).read_text().split()
  test = set(listed) & set(names)
  folds = _fold_ids(names, test)
  row = {n: i for i, n in enumerate(names)}
  features = np.load(features_path, mmap_mode='r')
  data_src = pathlib.Path(_DATA_DIR.value).resolve()
  made = []
  for k, val in enumerate(folds):
    root = out / 'folds' / f'fold{k}'
    data_dir, feature_dir = root / 'data', root / 'features'
    made.append((data_dir, feature_dir))
    if (root / 'done').exists():
      continue
    splits = {
      'train': sorted(n for j, f in enumerate(folds) if j != k for n in f),
      'dev': val,
      'test': sorted(test),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    for item in data_src.iterdir():
      link = data_dir / item.name
      if not link.exists() and not item.name.startswith('Flickr_'):
        link.symlink_to(item)
    for split, split_names in splits.items():
      (data_dir / f'Flickr_8k.{split}Images.txt').write_text(
        '\n'.join(split_names) + '\n'
      )
      store_split = {'dev': 'val'}.get(split, split)
      feature_store.write_feature_store(
        feature_store.store_dir(feature_dir, store_split),
        features[[row[n] for n in split_names]],
        [pathlib.Path(n).stem for n in split_names],
        {'name': 'efficientnet_lite0'},
        1024,
      )
    (root / 'done').write_text(
      json.dumps({s: len(v) for s, v in splits.items()})
    )
    _log(f'fold {k}: ' + ', '.join(f'{s} {len(v)}' for s, v in splits.items()))
  return made


def _train(config: pathlib.Path, workdir, data_dir, feature_dir, overrides):
  overrides = dict(
    overrides, embedding_dim=_EMBEDDING_DIM.value, units=_UNITS.value
  )
  command = [
    sys.executable,
    '-m',
    'capjax.train',
    f'--config={config}',
    f'--workdir={workdir}',
    f'--config.data_dir={data_dir}',
    f'--config.feature_dir={feature_dir}',
  ] + [f'--config.{k}={v}' for k, v in overrides.items()]
  _run(command, workdir.parent / f'{workdir.name}.log')


def _evaluate(workdir, *extra) -> None:
  command = [
    sys.executable,
    '-m',
    'capjax.evaluate',
    f'--workdir={workdir}',
    '--split=test',
    f'--bootstrap={_BOOTSTRAP.value}',
    *extra,
  ]
  _run(command, workdir.parent / f'{workdir.name}.log')


def _read(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


def _evaluations(workdir: pathlib.Path) -> list[tuple[int, float, float]]:
  """(step, validation CIDEr, its interval's lower end), step by step.

  A resumed run logs again the evaluations after its checkpoint; the last
  of each step is kept.
  """
  rows: dict[int, tuple[int, float, float]] = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if 'cider_low' in row:
      rows[row['step']] = (row['step'], row['cider'], row['cider_low'])
  return [rows[step] for step in sorted(rows)]


def stage_1(k: int, data_dir, feature_dir, runs, results) -> dict:
  """Fold k's cross-entropy model, trained and scored once."""
  result_path = results / f'fold{k}_stage1.json'
  if result_path.exists():
    return _read(result_path)
  workdir = runs / f'fold{k}' / 'stage1'
  workdir.parent.mkdir(parents=True, exist_ok=True)
  _log(f'fold {k}: stage 1 ({_STAGE_1_STEPS.value} steps)')
  cpu = _child_cpu_seconds()
  every = _STAGE_1_EVAL.value
  # 'last_within' logs each validation score's interval; all evaluated
  # checkpoints are kept, so either rule's step can be scored after.
  _train(
    _STAGE_1,
    workdir,
    data_dir,
    feature_dir,
    {
      'num_train_steps': _STAGE_1_STEPS.value,
      'eval_every_steps': every,
      'checkpoint_every_steps': every,
      'log_every_steps': every,
      'num_eval_examples': 0,
      'num_caption_eval_images': 10_000,
      'best_rule': 'last_within',
      'keep_checkpoints': _STAGE_1_STEPS.value // every + 1,
    },
  )
  from capjax.training import best as best_lib  # noqa: PLC0415

  evaluations = _evaluations(workdir)
  steps = best_lib.steps_kept(evaluations)
  rule = None
  if steps['last_within'] != steps['best']:
    _evaluate(
      workdir,
      f'--step={steps["last_within"]}',
      f'--compare={workdir}',
      f'--compare_step={steps["best"]}',
    )
    rule = _read(workdir / 'comparison_test_greedy.json')
  _evaluate(workdir, f'--step={steps["best"]}')
  result: dict[str, Any] = {
    'fold': k,
    'run': 'stage1',
    'best': _read(workdir / 'metrics_test_greedy.json'),
    'validation': evaluations,
    'steps_kept': steps,
    # The test CIDEr of 'last_within''s step minus 'best''s; None: the
    # same step.
    'last_within_vs_best': rule,
    'cpu_s': _child_cpu_seconds() - cpu,
  }
  result_path.write_text(json.dumps(result, indent=1))
  best = result['best']
  _log(
    f'fold {k}: stage 1 best step {best["step"]}, test CIDEr '
    f'{best["metrics"]["CIDEr"]:.3f} ({result["cpu_s"]:.0f} CPU s)'
  )
  return result


def scst_run(
  name: str, k: int, stage1: dict, data_dir, feature_dir, runs, results
) -> dict:
  """Fold k's SCST fine-tune with variant `name`, compared with stage 1."""
  result_path = results / f'fold{k}_{name}.json'
  if result_path.exists():
    return _read(result_path)
  variant = VARIANTS[name]
  source = runs / f'fold{k}' / 'stage1'
  workdir = runs / f'fold{k}' / name
  _log(f'fold {k}: {name} ({_SCST_STEPS.value} SCST steps)')
  cpu = _child_cpu_seconds()
  overrides = dict(
    variant.overrides,
    init_from=source,
    num_train_steps=_SCST_STEPS.value,
    eval_every_steps=_SCST_EVAL.value,
    checkpoint_every_steps=_SCST_EVAL.value,
    log_every_steps=_SCST_EVAL.value,
    batch_size=_SCST_BATCH.value * variant.captions_per_image,
    num_eval_examples=0,
    num_caption_eval_images=10_000,
  )
  best_step = stage1['best']['step']
  overrides['init_from_step'] = (
    _STAGE_1_STEPS.value if variant.later_start else best_step
  )
  _train(_STAGE_2, workdir, data_dir, feature_dir, overrides)
  _evaluate(workdir, f'--compare={source}', f'--compare_step={best_step}')
  result: dict[str, Any] = {
    'fold': k,
    'run': name,
    'variant': variant.help,
    'comparison': _read(workdir / 'comparison_test_greedy.json'),
    'cpu_s': _child_cpu_seconds() - cpu,
  }
  result_path.write_text(json.dumps(result, indent=1))
  cider = result['comparison']['difference']['CIDEr']
  _log(
    f'fold {k}: {name} test CIDEr gain {cider["value"]:+.3f} '
    f'[{cider["low"]:+.3f}, {cider["high"]:+.3f}] '
    f'({result["cpu_s"]:.0f} CPU s)'
  )
  return result


def summary(results: pathlib.Path, folds: int) -> str:
  """The variant x fold table of test CIDEr gains, as markdown."""
  header = ' | '.join(f'fold {k}' for k in range(folds))
  lines = [
    f'| variant | {header} | mean | spread (sd) | CPU h |',
    '|---' * (folds + 4) + '|',
  ]
  stage1 = [results / f'fold{k}_stage1.json' for k in range(folds)]
  cells, cpu = [], 0.0
  for path in stage1:
    if path.exists():
      r = _read(path)
      cpu += r['cpu_s']
      value = r['best']['metrics']['CIDEr']
      low, high = r['best']['intervals']['CIDEr']
      cells.append(
        f'{value:.3f} [{low:.3f}, {high:.3f}] (step {r["best"]["step"]})'
      )
    else:
      cells.append('')
  lines.append(
    f'| stage 1 test CIDEr | {" | ".join(cells)} | | | {cpu / 3600:.2f} |'
  )
  lines.extend(_rule_row(stage1))
  for name in VARIANTS:
    cells, gains, cpu = [], [], 0.0
    for k in range(folds):
      path = results / f'fold{k}_{name}.json'
      if not path.exists():
        cells.append('')
        continue
      r = _read(path)
      cpu += r['cpu_s']
      d = r['comparison']['difference']['CIDEr']
      gains.append(d['value'])
      cells.append(f'{d["value"]:+.3f} [{d["low"]:+.3f}, {d["high"]:+.3f}]')
    if not gains:
      continue
    spread = f'{np.std(gains, ddof=1):.3f}' if len(gains) > 1 else ''
    lines.append(
      f'| {name} | {" | ".join(cells)} | {np.mean(gains):+.3f} | {spread} '
      f'| {cpu / 3600:.2f} |'
    )
  return '\n'.join(lines)


def _rule_row(stage1: list[pathlib.Path]) -> list[str]:
  """The row of stage 1's 'last_within' step against its 'best' step."""
  cells, gains = [], []
  for path in stage1:
    r = _read(path) if path.exists() else {}
    if 'steps_kept' not in r:
      cells.append('')
      continue
    step = r['steps_kept']['last_within']
    if r['last_within_vs_best'] is None:
      cells.append(f'0 (same step, {step})')
      gains.append(0.0)
      continue
    d = r['last_within_vs_best']['difference']['CIDEr']
    gains.append(d['value'])
    cells.append(
      f'{d["value"]:+.3f} [{d["low"]:+.3f}, {d["high"]:+.3f}] (step {step})'
    )
  if not gains:
    return []
  spread = f'{np.std(gains, ddof=1):.3f}' if len(gains) > 1 else ''
  return [
    f'| stage 1, last_within - best | {" | ".join(cells)} '
    f'| {np.mean(gains):+.3f} | {spread} | |'
  ]


def _guarded(run, *args):
  """run(*args), or None when a program failed: the next rerun retries it."""
  try:
    return run(*args)
  except RuntimeError as e:
    _log(f"failed, retried on rerun (see the run's log): {e}")
    return None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  chosen = [n for n in VARIANTS if _ALL.value or _VARIANT_FLAGS[n].value]
  out = pathlib.Path(_OUT_DIR.value).resolve()
  runs, results = out / 'runs', out / 'results'
  results.mkdir(parents=True, exist_ok=True)
  folds = prepare_folds(out)
  start = time.time()
  losses = dict.fromkeys(chosen, 0)
  # The runs that answer most come first: every fold's stage 1 with the
  # first --first_pass variants, fold by fold; then the other variants,
  # fold by fold.
  first = [n for n in chosen if n in _FIRST_PASS.value]
  passes = [first, [n for n in chosen if n not in first]]
  for names in passes:
    for k, (data_dir, feature_dir) in enumerate(folds):
      stage1 = _guarded(stage_1, k, data_dir, feature_dir, runs, results)
      if stage1 is None:
        continue
      for name in names:
        if losses[name] >= _STOP_AFTER.value:
          _log(f'fold {k}: {name} skipped, it lost on {losses[name]} folds')
          continue
        result = _guarded(
          scst_run, name, k, stage1, data_dir, feature_dir, runs, results
        )
        if result is not None:
          gain = result['comparison']['difference']['CIDEr']['value']
          losses[name] += gain < 0
        table = summary(results, len(folds))
        (results / 'summary.md').write_text(table + '\n')
  table = summary(results, len(folds))
  (results / 'summary.md').write_text(table + '\n')
  _log(f'done in {(time.time() - start) / 60:.0f} min\n{table}')


if __name__ == '__main__':
  app.run(main)
