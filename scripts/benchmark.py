r"""Benchmarks capjax against the TensorFlow tutorial it rebuilds, on this machine.

  python scripts/benchmark.py [--quick] [--out_dir=benchmark_results]

Writes `benchmark.json` (every measurement and the settings) and
`benchmark.md` (the table, also printed) to --out_dir. --quick takes fewer
repeats and skips feature extraction: a smoke test, not a measurement.

Each capjax figure is timed interleaved with its baseline in the same process,
after one untimed warm-up call, and is the median of the repeats
(capjax.benchmarks.harness); every row is its own module of
capjax.benchmarks, whose docstring says exactly what it runs. capjax runs on
JAX's default device (a GPU if there is one); TensorFlow never sees a GPU
here, so the tutorial baselines always run on the CPU.
"""

import importlib.util
import json
import os
import pathlib
import tempfile

from absl import app
from absl import flags
import jax
import tensorflow as tf

from capjax.benchmarks import cider
from capjax.benchmarks import decoding
from capjax.benchmarks import extraction
from capjax.benchmarks import flops
from capjax.benchmarks import harness
from capjax.benchmarks import pipeline
from capjax.benchmarks import report as report_lib
from capjax.benchmarks import scst
from capjax.benchmarks import training

_OUT_DIR = flags.DEFINE_string('out_dir', 'benchmark_results',
                               'Where benchmark.json and benchmark.md go.')
_QUICK = flags.DEFINE_bool('quick', False, 'Fewer repeats, no extraction.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per figure '
                                '(2 with --quick).')
_DECODE_LEN = flags.DEFINE_integer('decode_len', 32, 'Tokens per caption.')

# The train step whose FLOP/s is compared with the matmul peak.
_EFFICIENCY_LENGTH = 32


def main(argv):
  del argv
  # Before TensorFlow touches a device: it must leave the accelerators to JAX.
  tf.config.set_visible_devices([], 'GPU')
  quick = _QUICK.value
  repeats = 2 if quick else _REPEATS.value
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
      'peak_flops': harness.matmul_peak_flops(repeats)}
  report['decoding'] = decoding.bench_decoding(
      repeats, _DECODE_LEN.value, tutorial_images=1 if quick else 2)
  # PyTorch is optional (the bench extra): without it, no PyTorch rows.
  if importlib.util.find_spec('torch') is not None:
    from capjax.benchmarks import torch_baseline  # pylint: disable=g-import-not-at-top
    report['torch'] = torch_baseline.bench_torch(repeats, _DECODE_LEN.value,
                                                 quick)
  report['cider'] = cider.bench_cider(repeats)
  report['scst'] = scst.bench_scst(repeats)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    report['pipeline_examples_per_s'] = pipeline.bench_pipeline(
        tmp, repeats, num_images=200 if quick else 500,
        num_batches=20 if quick else 100)
    if not quick:
      report['extraction_images_per_s'] = extraction.bench_extraction(
          tmp, patch_images=1000, inception_images=64)
  report['settings'] = {
      'quick': quick, 'repeats': repeats, 'cpus': os.cpu_count(),
      'processor': harness.processor_name(),
      'jax_device': jax.devices()[0].device_kind, 'jax': jax.__version__,
      'tensorflow': tf.__version__}
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'benchmark.json').write_text(json.dumps(report, indent=2) + '\n')
  table = report_lib.markdown(report)
  (out_dir / 'benchmark.md').write_text(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
