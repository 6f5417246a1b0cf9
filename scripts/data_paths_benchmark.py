r"""Train step time on each data path and per jitted call, on this machine.

  python scripts/data_paths_benchmark.py [--quick] [--out_dir=benchmark_results]

Writes `data_paths.json` and `data_paths.md` (the table, also printed) to
--out_dir. capjax.benchmarks.data_paths says what each row runs. --quick
uses smaller grids and a smaller demo set: a dry run, not a measurement.
"""

import pathlib
import tempfile

from absl import app
from absl import flags

from capjax.benchmarks import data_paths
from capjax.benchmarks import harness

_OUT_DIR = flags.DEFINE_string(
  'out_dir', 'benchmark_results', 'Where data_paths.json and .md go.'
)
_QUICK = flags.DEFINE_bool('quick', False, 'Small sizes: a dry run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved calls timed.')


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    report = data_paths.bench_data_paths(
      pathlib.Path(tmp), _REPEATS.value, _QUICK.value
    )
  harness.write_report(
    pathlib.Path(_OUT_DIR.value), 'data_paths', report, data_paths.markdown
  )


if __name__ == '__main__':
  app.run(main)
