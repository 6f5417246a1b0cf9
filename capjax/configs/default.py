r"""Default capjax configuration: the offline `shapes` demo.

It trains on the built-in synthetic `shapes` captions with the no-weights
`patches` extractor, so it needs no download and finishes on a laptop CPU:

  python -m capjax.train --workdir /tmp/capjax-demo

Named experiments in `experiments/` start from this config and override fields;
any field can also be overridden on the command line, e.g.
`--config.batch_size=128`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------
  # Caption source: 'shapes' (built-in, synthetic), 'coco_json' (COCO-format
  # caption JSON + image directory), 'flickr' (Flickr8k/30k token file + split
  # lists + image directory) or 'tfds_coco' (TFDS coco_captions, Karpathy
  # splits).
  config.dataset = 'shapes'
  # Where the source's files live: the TFDS data_dir for 'tfds_coco'; for
  # 'shapes', where it is generated (empty: ~/.cache/capjax/shapes).
  config.data_dir = ''
  # Splits used for training and for periodic evaluation. Several training
  # splits are joined with '+', e.g. 'train+restval' for Karpathy COCO.
  config.train_split = 'train'
  config.eval_split = 'val'
  # Settings of the built-in synthetic data set.
  config.shapes = ml_collections.ConfigDict()
  config.shapes.seed = 0
  config.shapes.image_size = 64
  config.shapes.num_train = 4000
  config.shapes.num_val = 200
  config.shapes.num_test = 200

  # Feature extractor: 'inception_v3' (Keras InceptionV3, 8x8x2048 -> 64x2048)
  # or 'patches' (no weights; a grid of pixel patches, made for 'shapes').
  config.extractor = 'patches'
  # 'imagenet' or 'none' (random weights, for tests) for inception_v3.
  config.extractor_weights = 'imagenet'
  # What computes inception_v3: 'jax' (capjax.model.inception on Keras'
  # weights), 'keras' (TensorFlow), or 'auto': JAX on a GPU or TPU, Keras on
  # a CPU, where it measured faster. Their features are interchangeable.
  config.extractor_backend = 'auto'
  # Grid cells per side for 'patches' (L = patch_grid**2).
  config.patch_grid = 4
  # Where extracted features are stored; empty means `<workdir>/features`.
  config.feature_dir = ''
  # Images per extraction batch and per feature shard file.
  config.extract_batch_size = 32
  config.shard_size = 1024

  # Vocabulary: the `top_k` most frequent training words (plus <pad>, <start>,
  # <end> and <unk>).
  config.top_k = 5000
  # Captions longer than this many tokens (with <start> and <end>) are cut,
  # keeping <end>.
  config.max_caption_len = 48
  # Batches are padded to the smallest of these lengths that fits their
  # longest caption (each distinct length is one compile); the last one must
  # be max_caption_len.
  config.bucket_lengths = (12, 16, 20, 24, 32, 48)
  # Batch captions of similar length together (sorted within each shuffling
  # block, the batches then shuffled), so that batches pad little. Off by
  # default: it trained worse per step (docs/design.md).
  config.group_by_length = False
  # Keep the features of the training set in memory after the first epoch.
  config.cache_features = True
  config.shuffle_buffer = 10_000
  # Where training batches are made (capjax.training.device_data). 'on': the
  # split's float16 grids and tokens are put on the devices once, and each
  # step gathers its batch there from the schedule's example ids (the same
  # batches as the host's, to the bit); refused in one line if they fit no
  # device. 'off': the host reads each batch and copies it over (prefetched
  # two steps ahead). 'auto': 'on' where the data fits in half of each
  # device's free memory, else 'off'; the log says which and why.
  config.device_data = 'auto'
  # With device_data on, several devices: 'replicated' (each holds all the
  # grids, no communication), 'sharded' (each holds 1/n of them; each step
  # gathers its rows across the devices with one collective) or 'auto'
  # (replicated where a replica fits, else sharded).
  config.device_data_layout = 'auto'

  # --- Model ----------------------------------------------------------------
  # Half the tutorial's sizes (256, 512), which `shapes` does not need: the
  # demo then trains in a few minutes on a laptop CPU.
  config.embedding_dim = 128
  config.units = 256
  # Carry the GRU state from step to step. False reproduces the tutorial's
  # decoder, whose GRU starts from a zero state at every step (its output only
  # reaches the next step through the attention query).
  config.carry_gru_state = True
  # Compute dtype: 'float32', or 'bfloat16' (parameters stay float32).
  config.dtype = 'float32'
  # Dropout on the token embeddings and on the decoder outputs (0 = off).
  config.dropout_rate = 0.0
  # Show, Attend and Tell's doubly stochastic attention penalty
  # lambda * sum_i (1 - sum_t alpha_ti)^2 (0 = off).
  config.attention_penalty = 0.0

  # --- Training -------------------------------------------------------------
  config.seed = 0
  # Global batch size, split over all devices of all processes.
  config.batch_size = 64
  config.num_train_steps = 3000
  # 'constant' (the tutorial's), or 'warmup_cosine': linear warmup over
  # warmup_steps to learning_rate, then cosine decay to 0 at num_train_steps;
  # the demo learns `shapes` better with it (docs/design.md).
  config.schedule = 'warmup_cosine'
  config.learning_rate = 3e-3
  # Keras' Adam defaults, as the tutorial used them (optax applies epsilon
  # after bias correction, Keras before; the difference only shows for
  # gradients near epsilon in size).
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-7
  config.warmup_steps = 100
  # Clip gradients to this global norm (0 = off).
  config.grad_clip_norm = 0.0

  # --- Objective --------------------------------------------------------------
  # 'xent': cross-entropy on the reference captions (teacher forcing).
  # 'scst': self-critical sequence training (capjax.training.scst): sampled
  # captions scored by CIDEr-D against each image's references; the batch
  # then counts images, not captions. It fine-tunes a cross-entropy model,
  # so it needs init_from.
  config.objective = 'xent'
  # A workdir whose checkpoint (its best, else its newest) starts a new run,
  # with a fresh optimizer; its vocabulary is used and its features must be
  # these. Empty: start from random parameters.
  config.init_from = ''
  # The step of init_from's checkpoint to start from; 0: its best checkpoint
  # (else its newest).
  config.init_from_step = 0
  # SCST: captions sampled per image (temperature 1), and the baseline each
  # one's reward is compared with: 'greedy', the reward of the image's greedy
  # caption (Rennie et al. 2017), or 'mean', the mean reward of the image's
  # other samples (needs scst_samples >= 2).
  config.scst_samples = 5
  config.scst_baseline = 'greedy'
  # SCST: weight of a cross-entropy term on the batch's reference captions
  # mixed into the policy-gradient loss (0 = off): minus the mean over
  # references of their log-probability, summed over tokens as the samples'
  # is, so that it anchors the policy to the human captions (Paulus et al.
  # 2018's mixed objective).
  config.scst_xent_weight = 0.0

  # --- Bookkeeping ----------------------------------------------------------
  # Train steps run per jitted call (a lax.scan over the step): for small
  # models, where launching each step costs more than the step. Metrics,
  # checkpoints, evaluation and stops happen between calls, so it must divide
  # the three intervals below.
  config.steps_per_dispatch = 1
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # Examples used by each periodic evaluation (0 = the whole eval split).
  config.num_eval_examples = 1000
  # Images greedily captioned at each evaluation for BLEU-4 and CIDEr
  # (0 = skip).
  config.num_caption_eval_images = 200
  # The validation metric whose best evaluation is kept, apart from the
  # newest checkpoints, as the best checkpoint that `sample`, `evaluate` and
  # `serve` load by default: 'cider' or 'bleu4' (of the captions above;
  # higher is better) or 'loss' (lower is better). With the caption
  # evaluation off, 'cider' and 'bleu4' fall back to 'loss'.
  config.best_metric = 'cider'
  # Which evaluation's checkpoint is kept as the best: 'best', the highest
  # score; or 'last_within', the newest evaluation whose score lies inside
  # the 95% bootstrap interval of the highest (capjax.training.best), which
  # prefers the longer-trained model when the difference is noise. Needs
  # best_metric 'cider' or 'bleu4'.
  config.best_rule = 'best'

  return config
