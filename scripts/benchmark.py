r"""Benchmarks capjax against the TensorFlow tutorial it rebuilds, here.

  python scripts/benchmark.py [--quick] [--out_dir=benchmark_results]
      [--time_to_quality_data=DIR --time_to_quality_features=DIR]
      [--time_to_quality_only]

Writes `benchmark.json` (every measurement and the settings) and
`benchmark.md` (the table, also printed) to --out_dir. --quick takes fewer
repeats and skips feature extraction: a smoke test, not a measurement.

The time-to-quality row (capjax.benchmarks.time_to_quality) needs real
captions and features: a Flickr8k-format data directory (captions and split
lists, as `--config.dataset=flickr` reads) and the feature store of its
train and val splits (`python -m capjax.features`). It trains both
captioners for up to --time_to_quality_minutes each.

Each capjax figure is timed interleaved with its baseline in the same process,
after one untimed warm-up call, and is the median of the repeats
(capjax.benchmarks.harness); every row is its own module of
capjax.benchmarks, whose docstring says exactly what it runs. capjax runs on
JAX's default device (a GPU if there is one); TensorFlow never sees a GPU
here, so the tutorial baselines always run on the CPU.
"""

import importlib.util
import os
import pathlib
import tempfile

from absl import app
from absl import flags
import jax
import tensorflow as tf

from capjax import programs
from capjax.benchmarks import cider
from capjax.benchmarks import decoding
from capjax.benchmarks import extraction
from capjax.benchmarks import flops
from capjax.benchmarks import harness
from capjax.benchmarks import pipeline
from capjax.benchmarks import report as report_lib
from capjax.benchmarks import scst
from capjax.benchmarks import time_to_quality
from capjax.benchmarks import training

_OUT_DIR = flags.DEFINE_string(
  'out_dir', 'benchmark_results', 'Where benchmark.json and benchmark.md go.'
)
_QUICK = flags.DEFINE_bool('quick', False, 'Fewer repeats, no extraction.')
_REPEATS = flags.DEFINE_integer(
  'repeats', 5, 'Timed runs per figure (2 with --quick).'
)
_DECODE_LEN = flags.DEFINE_integer('decode_len', 32, 'Tokens per caption.')
_TTQ_DATA = flags.DEFINE_string(
  'time_to_quality_data',
  '',
  'Flickr8k-format data directory of the '
  'time-to-quality row (empty: no such row).',
)
_TTQ_FEATURES = flags.DEFINE_string(
  'time_to_quality_features', '', 'Its feature store (train and val).'
)
_TTQ_TARGET = flags.DEFINE_float(
  'time_to_quality_loss', 3.3, 'The validation loss both must reach.'
)
_TTQ_MINUTES = flags.DEFINE_float(
  'time_to_quality_minutes', 15, 'Training time allowed to each, minutes.'
)
_TTQ_EVAL_EVERY = flags.DEFINE_integer(
  'time_to_quality_eval_every', 20, 'Steps between validation losses.'
)
_TTQ_ONLY = flags.DEFINE_bool(
  'time_to_quality_only', False, 'Run the time-to-quality row alone.'
)

# The train step whose FLOP/s is compared with the matmul peak.
_EFFICIENCY_LENGTH = 32


def _time_to_quality() -> dict:
  config = time_to_quality.flickr_config(_TTQ_DATA.value, _TTQ_FEATURES.value)
  return time_to_quality.bench_time_to_quality(
    config,
    target_loss=_TTQ_TARGET.value,
    max_seconds=60 * _TTQ_MINUTES.value,
    eval_every=_TTQ_EVAL_EVERY.value,
  )


def _settings(quick: bool, repeats: int) -> dict:
  return {
    'quick': quick,
    'repeats': repeats,
    'cpus': os.cpu_count(),
    'processor': harness.processor_name(),
    'jax_device': jax.devices()[0].device_kind,
    'jax': jax.__version__,
    'tensorflow': tf.__version__,
  }


def _write(report: dict, make_table) -> None:
  harness.write_report(
    pathlib.Path(_OUT_DIR.value), 'benchmark', report, make_table
  )


def main(argv):
  del argv
  if _TTQ_ONLY.value or _TTQ_DATA.value:
    if not (_TTQ_DATA.value and _TTQ_FEATURES.value):
      raise app.UsageError(
        'the time-to-quality row needs both '
        '--time_to_quality_data and '
        '--time_to_quality_features'
      )
  quick = _QUICK.value
  repeats = 2 if quick else _REPEATS.value
  if _TTQ_ONLY.value:
    report = {
      'time_to_quality': _time_to_quality(),
      'settings': _settings(quick, repeats),
    }
    _write(report, report_lib.time_to_quality_markdown)
    return
  report = {'training': training.bench_training(repeats)}
  step_s = report['training']['fixed_length'][_EFFICIENCY_LENGTH]
  model_flops = flops.train_flops(_EFFICIENCY_LENGTH)
  tutorial_flops = flops.tutorial_train_flops(_EFFICIENCY_LENGTH)
  report['efficiency'] = {
    'length': _EFFICIENCY_LENGTH,
    'model_flops': model_flops,
    'achieved_flops': model_flops / step_s['capjax_step_s'],
    'tutorial_model_flops': tutorial_flops,
    'tutorial_achieved_flops': tutorial_flops / step_s['tutorial_step_s'],
    'peak_flops': harness.matmul_peak_flops(repeats),
  }
  report['decoding'] = decoding.bench_decoding(
    repeats, _DECODE_LEN.value, tutorial_images=1 if quick else 2
  )
  # ONNX Runtime is optional (the export extra): without it, no export rows.
  if importlib.util.find_spec('jax2onnx') is not None:
    from capjax.benchmarks import export  # noqa: PLC0415

    report['export'] = export.bench_export(repeats, _DECODE_LEN.value)
  # PyTorch is optional (the bench extra): without it, no PyTorch rows.
  if importlib.util.find_spec('torch') is not None:
    from capjax.benchmarks import torch_baseline  # noqa: PLC0415

    report['torch'] = torch_baseline.bench_torch(
      repeats, _DECODE_LEN.value, quick
    )
  report['cider'] = cider.bench_cider(repeats)
  report['scst'] = scst.bench_scst(repeats)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    report['pipeline_examples_per_s'] = pipeline.bench_pipeline(
      tmp,
      repeats,
      num_images=200 if quick else 500,
      num_batches=20 if quick else 100,
    )
    if not quick:
      report['extraction_images_per_s'] = extraction.bench_extraction(
        tmp, patch_images=1000, inception_images=64
      )
  if _TTQ_DATA.value:
    report['time_to_quality'] = _time_to_quality()
  report['settings'] = _settings(quick, repeats)
  _write(report, report_lib.markdown)


if __name__ == '__main__':
  # TensorFlow, imported above, is kept off the accelerators JAX uses.
  programs.run(main)
