r"""Flickr8k with InceptionV3 features.

Unpack the Flickr8k text and image archives into one directory, DATA, so that
it holds `Flickr8k.token.txt`, `Flickr_8k.{train,dev,test}Images.txt` and the
images (`Flicker8k_Dataset/`, as distributed).

  DATA=~/data/flickr8k
  FEATURES=~/capjax/features/flickr8k_inception
  python -m capjax.features --config experiments/flickr8k_inception.py \
      --config.data_dir $DATA --split train+val+test --feature_dir $FEATURES
  python -m capjax.train --config experiments/flickr8k_inception.py \
      --config.data_dir $DATA --config.feature_dir $FEATURES \
      --workdir ~/capjax/runs/flickr8k
  python -m capjax.evaluate --workdir ~/capjax/runs/flickr8k --split test
"""

from capjax.configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'flickr'
  config.train_split = 'train'
  config.eval_split = 'val'
  config.extractor = 'inception_v3'
  # 6,000 training grids of 64 x 2048 float16: 1.6 GB, fine in memory.
  config.cache_features = True

  config.top_k = 5000
  config.embedding_dim = 256
  config.units = 512
  # Flickr8k is small: dropout helps against overfitting.
  config.dropout_rate = 0.3

  config.batch_size = 64
  config.schedule = 'constant'
  config.learning_rate = 1e-3
  # About 20 epochs of the 30,000 training captions.
  config.num_train_steps = 10_000
  config.log_every_steps = 100
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  config.num_eval_examples = 5_000
  return config
