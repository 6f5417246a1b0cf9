r"""Train step time on each data path and per jitted call, on this machine.

  python scripts/data_paths_benchmark.py [--quick] [--out_dir=benchmark_results]

Writes `data_paths.json` and `data_paths.md` (the table, also printed) to
--out_dir. capjax.benchmarks.data_paths says what each row runs. --quick
uses smaller grids and a smaller demo set: a dry run, not a measurement.
"""

import json
import pathlib
import tempfile

from absl import app
from absl import flags

from capjax.benchmarks import data_paths

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
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'data_paths.json').write_text(json.dumps(report, indent=2) + '\n')
  table = data_paths.markdown(report)
  (out_dir / 'data_paths.md').write_text(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
