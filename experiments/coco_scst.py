r"""COCO (Karpathy splits), stage 2: self-critical training on CIDEr-D (SCST).

Stage 1 is experiments/coco_inception.py (cross-entropy, the tutorial's
setup); this config starts from that workdir's best checkpoint, with its
vocabulary and features, a new optimizer and a new workdir, and trains on
the CIDEr-D of 5 sampled captions per image against a greedy baseline, the
document frequencies taken from the training references.

  FEATURES=~/capjax/features/coco_inception
  # Stage 1, as in experiments/coco_inception.py:
  python -m capjax.train --config experiments/coco_inception.py \
      --config.feature_dir $FEATURES --workdir ~/capjax/runs/coco_inception
  # Stage 2:
  python -m capjax.train --config experiments/coco_scst.py \
      --config.feature_dir $FEATURES \
      --config.init_from ~/capjax/runs/coco_inception \
      --workdir ~/capjax/runs/coco_scst
  python -m capjax.evaluate --workdir ~/capjax/runs/coco_scst --split test \
      --beam_size 3
"""

import pathlib

from capjax import configs


def get_config():
  config = configs.load(pathlib.Path(__file__).with_name('coco_inception.py'))
  config.objective = 'scst'
  config.scst_samples = 5
  config.scst_baseline = 'greedy'
  # Rennie et al. fine-tune at 5e-5, 20x below the cross-entropy rate.
  config.learning_rate = 5e-5
  # The batch counts images (each with K samples), not captions: about 30
  # epochs of the 113,000 Karpathy training images, as ruotianluo's runs.
  config.batch_size = 64
  config.num_train_steps = 50_000
  config.log_every_steps = 100
  config.eval_every_steps = 2_500
  config.checkpoint_every_steps = 2_500
  return config
