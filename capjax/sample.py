r"""Captions for images: `python -m capjax.sample --workdir DIR IMAGE ...`.

  python -m capjax.sample --workdir /tmp/capjax-demo \
    /tmp/capjax-demo/examples/*.png
  python -m capjax.sample --workdir /tmp/coco photo.jpg --beam_size 3
  python -m capjax.sample --workdir /tmp/coco photo.jpg --temperature 0.8
  python -m capjax.sample --workdir /tmp/coco photo.jpg --plot_dir /tmp/plots

Prints `IMAGE: caption` per image. An IMAGE may also be a `.npy` file of
precomputed features, (L, D) or (H, W, D) as the workdir's extractor makes
them. With --plot_dir, writes one PNG per image with the attention map behind
every word. An unreadable image is reported and skipped; the others still get
their captions, and the exit status is 1.
"""

from collections.abc import Sequence
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging

from capjax import errors
from capjax import inference
from capjax import plots
from capjax import programs

_CHECKPOINT = programs.define_checkpoint_flags()
_DECODER = programs.define_decoder_flags()
_TEMPERATURE = flags.DEFINE_float(
  'temperature',
  0.0,
  'Sample each word at this temperature (0 = deterministic decoding).',
  lower_bound=0.0,
)
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed of --temperature.')
_PLOT_DIR = flags.DEFINE_string(
  'plot_dir', '', 'Write attention plots here, one PNG per image.'
)


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    raise app.UsageError('name one or more images (or .npy feature files)')
  if _TEMPERATURE.value > 0 and _DECODER.beam_size.value > 1:
    raise errors.UserError(
      'give --temperature (sampling) or --beam_size (search), not both'
    )
  trained = inference.load_trained(
    _CHECKPOINT.workdir.value, _CHECKPOINT.step.value
  )
  results = inference.caption_files(
    trained,
    paths,
    beam_size=_DECODER.beam_size.value,
    alpha=_DECODER.alpha.value,
    temperature=_TEMPERATURE.value,
    seed=_SEED.value,
    max_len=_DECODER.max_len.value or None,
  )
  if _PLOT_DIR.value:
    pathlib.Path(_PLOT_DIR.value).mkdir(parents=True, exist_ok=True)
  taken: set[str] = set()
  for r in results:
    if r.error is not None:
      logging.error('%s: %s', r.path, r.error)
      continue
    print(f'{r.path}: {r.caption}', flush=True)
    if _PLOT_DIR.value and r.attention_TL is not None:
      plots.plot_attention(
        plots.plot_path(_PLOT_DIR.value, r.path, taken),
        r.caption.split(),
        r.attention_TL,
        r.image_HW3,
      )
  failed = sum(r.error is not None for r in results)
  if failed:
    logging.error('%d of %d files could not be captioned', failed, len(results))
    sys.exit(1)


if __name__ == '__main__':
  programs.run(main)
