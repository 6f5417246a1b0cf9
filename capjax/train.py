r"""Training: `python -m capjax.train --workdir DIR [--config FILE]`.

The default config is the offline `shapes` demo; named experiments live in
`experiments/`. Any config field can be overridden on the command line:

  python -m capjax.train --workdir /tmp/capjax-demo
  python -m capjax.train --workdir /tmp/coco \
      --config experiments/coco_inception.py --config.batch_size=128

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from capjax import configs
from capjax import programs
from capjax.training import loop
from capjax.training import parallel

_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'Directory for checkpoints, metrics and the model.',
  required=True,
)
_CONFIG = config_flags.DEFINE_config_file(
  'config',
  configs.DEFAULT_FILE,
  'Training configuration file.',
  lock_config=True,
)
_PROCESSES = programs.define_process_flags()


def main(argv: Sequence[str]) -> None:
  programs.refuse_arguments(argv)
  parallel.maybe_initialize_distributed(*_PROCESSES.values())
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  programs.run(main)
