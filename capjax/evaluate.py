r"""Caption metrics of a split: `python -m capjax.evaluate --workdir DIR`.

  python -m capjax.evaluate --workdir /tmp/capjax-demo --split test
  python -m capjax.evaluate --workdir /tmp/coco --split val --beam_size 3
  python -m capjax.evaluate --workdir /tmp/scst --compare /tmp/xent

Decodes every image of the split (default: test) with the workdir's best
checkpoint (else its newest, or the one --step names), scores the captions
against all of each image's references with the COCO caption evaluation,
writes captions_{split}_{decoder}.json and metrics_{split}_{decoder}.json
into the workdir and prints the scores, each with its 95% bootstrap interval
over the images (--bootstrap resamples; 0: none). The split's features come
from the feature store; for `shapes` they are extracted when absent. Without
Java, METEOR is left out and captions are tokenised without PTB.

With --compare OTHER_WORKDIR, OTHER's model captions the same images with the
same decoder, and each metric's difference (this workdir's minus OTHER's)
is printed with its paired-bootstrap interval and written to
comparison_{split}_{decoder}.json.
"""

from collections.abc import Sequence

from absl import flags

from capjax import evaluation
from capjax import programs

_CHECKPOINT = programs.define_checkpoint_flags()
_DECODER = programs.define_decoder_flags()
_SPLIT = flags.DEFINE_string('split', 'test', 'The split to caption.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images decoded at once.')
_NUM_IMAGES = flags.DEFINE_integer(
  'num_images', 0, "Caption the split's first images only (0: all)."
)
_BOOTSTRAP = flags.DEFINE_integer(
  'bootstrap',
  1000,
  'Resamples of the images for the 95% intervals (0: no intervals).',
  lower_bound=0,
)
_SEED = flags.DEFINE_integer('seed', 0, "The bootstrap's seed.")
_COMPARE = flags.DEFINE_string(
  'compare',
  None,
  'Another workdir to compare with on the same images (paired bootstrap).',
)
_COMPARE_STEP = flags.DEFINE_integer(
  'compare_step',
  None,
  "--compare's checkpoint step; default: its best, else its newest.",
  lower_bound=0,
)


def main(argv: Sequence[str]) -> None:
  programs.refuse_arguments(argv)
  report = evaluation.evaluate_split(
    _CHECKPOINT.workdir.value,
    _SPLIT.value,
    beam_size=_DECODER.beam_size.value,
    alpha=_DECODER.alpha.value,
    batch_size=_BATCH_SIZE.value,
    max_len=_DECODER.max_len.value or None,
    num_images=_NUM_IMAGES.value,
    step=_CHECKPOINT.step.value,
    bootstrap=_BOOTSTRAP.value,
    seed=_SEED.value,
    compare=_COMPARE.value,
    compare_step=_COMPARE_STEP.value,
  )
  print(evaluation.format_report(report), flush=True)


if __name__ == '__main__':
  programs.run(main)
