r"""A trained captioner for use without capjax: `python -m capjax.export`.

  python -m capjax.export --workdir /tmp/coco --out /tmp/coco-onnx
  python -m capjax.export --workdir /tmp/coco --out /tmp/coco-beam \
      --beam_size 3 --alpha 0.6
  python -m capjax.export --workdir /tmp/coco --out /tmp/coco-tf \
      --format saved_model

Writes one graph from resized pixels to captions (the extractor, the
encoder and the whole search loop) with a dynamic batch dimension, beside
vocab.json and capjax_export.json, in the layout Triton (ONNX) and
TensorFlow Serving (SavedModel) read: OUT/model/1/. With --from_features the
graph starts from feature grids instead. examples/onnx_caption.py is a
client that needs only onnxruntime, NumPy and Pillow.
"""

from collections.abc import Sequence

from absl import flags

from capjax import programs
from capjax.exporting import artifact

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'A trained workdir.', required=True
)
_OUT = flags.DEFINE_string(
  'out', None, 'The artifact directory to write.', required=True
)
_FORMAT = flags.DEFINE_enum(
  'format',
  'onnx',
  artifact.FORMATS,
  'onnx (ONNX Runtime, Triton) or saved_model (TensorFlow Serving).',
)
_STEP = flags.DEFINE_integer(
  'step',
  None,
  "The checkpoint's step; default: the best checkpoint "
  '(config.best_metric), else the newest.',
  lower_bound=0,
)
_BEAM_SIZE = flags.DEFINE_integer(
  'beam_size', 1, 'Beam search width; 1 is greedy search.'
)
_ALPHA = flags.DEFINE_float(
  'alpha', 0.0, "Beam search's length normalisation (GNMT alpha; 0 = off)."
)
_MAX_LEN = flags.DEFINE_integer(
  'max_len',
  0,
  "Most words per caption, <end> included; 0: the config's longest caption.",
)
_FROM_FEATURES = flags.DEFINE_bool(
  'from_features',
  False,
  'The graph takes feature grids (B, L, D), not pixels: for features made '
  'outside capjax (capjax.features --from_numpy).',
)


def main(argv: Sequence[str]) -> None:
  programs.refuse_arguments(argv)
  exported = artifact.export_workdir(
    _WORKDIR.value,
    _OUT.value,
    fmt=_FORMAT.value,
    beam_size=_BEAM_SIZE.value,
    alpha=_ALPHA.value,
    max_len=_MAX_LEN.value or None,
    step=_STEP.value,
    from_features=_FROM_FEATURES.value,
  )
  d = exported.description
  print(
    f'{exported.model}: {d["search"]["name"]} search of step '
    f'{d["checkpoint_step"]}, {exported.size_bytes() / 1e6:.1f} MB, '
    f'exported in {exported.seconds:.1f} s'
  )


if __name__ == '__main__':
  programs.run(main)
