r"""Models trained with the TensorFlow tutorial, as capjax workdirs.

  python -m capjax.convert --tf_checkpoint ./checkpoints/train \
      --tokenizer tokenizer.json --workdir ~/capjax/runs/tutorial
  python -m capjax.sample --workdir ~/capjax/runs/tutorial photo.jpg

--tf_checkpoint is the tutorial's `tf.train.CheckpointManager` directory (its
latest checkpoint is taken) or one checkpoint's prefix (`.../ckpt-5`), a
`tf.train.Checkpoint(encoder=encoder, decoder=decoder, optimizer=optimizer)`
(the optimizer is optional) saved by TF 2.x with Keras 2 or Keras 3.
--tokenizer is the tutorial's `tokenizer.to_json()` or a {word: id} JSON.
--config (default capjax/configs/default.py, e.g. experiments/coco_inception.py
for evaluation on COCO) supplies what the checkpoint does not say: the data
set, caption length, training settings. See capjax.porting for how weights
and word ids are mapped.
"""

from collections.abc import Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from capjax import configs
from capjax import programs
from capjax.porting import tutorial_workdir

_TF_CHECKPOINT = flags.DEFINE_string(
  'tf_checkpoint',
  None,
  "The tutorial's checkpoint directory (its latest "
  'checkpoint is converted) or one checkpoint prefix.',
  required=True,
)
_TOKENIZER = flags.DEFINE_string(
  'tokenizer',
  None,
  "The tutorial's tokenizer: tokenizer.to_json(), or a {word: id} JSON object.",
  required=True,
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'The capjax workdir to write.', required=True
)
_CONFIG = config_flags.DEFINE_config_file(
  'config',
  configs.DEFAULT_FILE,
  'Config of the fields the checkpoint does not fix (data set, caption '
  'length, training).',
  lock_config=True,
)


def main(argv: Sequence[str]) -> None:
  programs.refuse_arguments(argv)
  tutorial_workdir.convert(
    _TF_CHECKPOINT.value, _TOKENIZER.value, _WORKDIR.value, _CONFIG.value
  )
  logging.info(
    'wrote %s; caption images with\n  python -m capjax.sample '
    '--workdir %s IMAGE',
    _WORKDIR.value,
    _WORKDIR.value,
  )


if __name__ == '__main__':
  programs.run(main)
