r"""A short check of capjax on an accelerator, without TensorFlow: one table.

  python scripts/accelerator_check.py [--quick] [--out_dir=accelerator_results]

Needs only JAX, flax, optax, orbax, numpy, pillow, matplotlib, PyTorch and
absl-py: no TensorFlow, TFDS, ml_collections or pycocoevalcap. Writes
`accelerator.json` and `accelerator.md` (the table, also printed) to
--out_dir. capjax.benchmarks.accelerator says what each row runs. --quick
runs every row at tiny sizes: a dry run on a CPU, not a measurement.
"""

import os
import pathlib

# JAX and PyTorch share the accelerator: JAX must not take most of its
# memory up front, as it does by default. Before JAX is imported.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# noqa: PLC0415, E402
from absl import app
from absl import flags

from capjax.benchmarks import accelerator
from capjax.benchmarks import harness

_OUT_DIR = flags.DEFINE_string(
  'out_dir', 'accelerator_results', 'Where accelerator.json and .md go.'
)
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny sizes: a dry run.')
# Start-up, the last row begun within the budget and the writing fit in the
# rest of 8 minutes on an H200.
_TIME_BUDGET_S = flags.DEFINE_float(
  'time_budget_s', 360, 'Rows not begun within this many seconds are skipped.'
)


def main(argv):
  del argv
  plan = accelerator.QUICK if _QUICK.value else accelerator.FULL
  report = accelerator.run(plan, _TIME_BUDGET_S.value)
  harness.write_report(
    pathlib.Path(_OUT_DIR.value), 'accelerator', report, accelerator.markdown
  )


if __name__ == '__main__':
  app.run(main)
