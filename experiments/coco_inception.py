r"""The tutorial's setup at full scale: COCO (Karpathy splits), InceptionV3.

TFDS `coco_captions` train+restval for training, InceptionV3 8x8x2048 grids,
the 5000 most frequent words, E 256, U 512, batch 64, Adam 1e-3, as in the
TensorFlow tutorial (which trained on a 30,000-caption subset).

  # Once: download and prepare COCO 2014 with the Karpathy splits (~40 GB).
  tfds build coco_captions --data_dir ~/tensorflow_datasets

  # Once: InceptionV3 features of every split (float16, ~8.5 GB per 100k
  # images). Resumable: rerun after an interruption.
  FEATURES=~/capjax/features/coco_inception
  python -m capjax.features --config experiments/coco_inception.py \
      --split train+restval+val+test --feature_dir $FEATURES

  # Train; rerunning the same command resumes from the last checkpoint.
  python -m capjax.train --config experiments/coco_inception.py \
      --config.feature_dir $FEATURES --workdir ~/capjax/runs/coco_inception

  # Score the Karpathy test split (BLEU, METEOR, ROUGE-L, CIDEr).
  python -m capjax.evaluate --workdir ~/capjax/runs/coco_inception \
      --split test --beam_size 3
"""

from capjax.configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'tfds_coco'
  # TFDS's data_dir; empty means TFDS's default, ~/tensorflow_datasets.
  config.data_dir = ''
  config.train_split = 'train+restval'
  config.eval_split = 'val'
  config.extractor = 'inception_v3'
  config.extractor_weights = 'imagenet'
  # 113k images x 64 x 2048 float16 do not fit in memory.
  config.cache_features = False

  config.top_k = 5000
  config.embedding_dim = 256
  config.units = 512

  config.batch_size = 64
  config.schedule = 'constant'
  config.learning_rate = 1e-3
  # About 6 epochs of train+restval's 566k captions.
  config.num_train_steps = 50_000
  config.log_every_steps = 200
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  config.num_eval_examples = 5_000
  return config
