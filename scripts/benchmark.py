r"""Benchmarks capjax against the TensorFlow tutorial it rebuilds, on this machine.

  python scripts/benchmark.py [--quick] [--out_dir=benchmark_results]

Writes `benchmark.json` (every measurement and the settings) and
`benchmark.md` (the table, also printed) to --out_dir. --quick takes fewer
repeats and skips feature extraction: a smoke test, not a measurement.

All figures use the tutorial's sizes: vocabulary V=5001, E=256, U=512,
L=64 positions of D=2048 features, batch 64, random weights and features
(the work done does not depend on their values). Each capjax figure is timed
interleaved with its baseline in the same process, after one untimed warm-up
call (compilation, tracing), and is the median of the repeats: on a shared
machine the ratios are more trustworthy than the absolute rates.

1. Training (captions/s): capjax's `train.train_step`, jitted with the state
   donated, with its default model (the GRU carries its state), against the
   tutorial's training (tests/tf_reference.py's Keras model with
   carry_gru_state=False, the tutorial verbatim): a `tf.function` train step
   with a Python loop over time steps, W1 on the features recomputed every
   step, the loss a sum over steps of batch-mean masked cross-entropy, Adam.
   Both do the same work per step apart from W1. At caption lengths T = 16,
   32 and 48, and on the real lengths of the Flickr8k training captions
   (from $CAPJAX_TEST_DATA or ../shared/data; skipped if absent): capjax
   batches them as its input pipeline does with the default config (each
   batch padded to the smallest of config.bucket_lengths that fits it), with
   random batches (the default) and with config.group_by_length, so its rate
   is 64 / E[step time] over the buckets' frequencies in two epochs of
   batches; the tutorial pads every caption to the longest.
2. Greedy decoding, --decode_len tokens (random weights never produce <end>,
   so every caption runs the full length): capjax's `decode.greedy_captions`
   (one jitted `lax.while_loop`) at batch 64 and batch 1, against the
   tutorial's `evaluate()`: one image at a time, the Keras decoder called
   eagerly once per token, the argmax read back to Python. A kinder baseline
   runs the same per-token loop around capjax's own jitted `decode_step`; it
   must produce capjax's captions. Beam search is listed for reference.
3. Input pipeline (examples/s): capjax's `TrainBatches` (with and without
   config.cache_features) against the tutorial's one float32 .npy file per
   image read by `tf.numpy_function` once per caption, on the same data.
4. Efficiency: model FLOPs per second of capjax's train step at T=32 against
   the float32 matmul peak measured in the same run (median rate of a
   2048x2048 `jnp.dot`). The FLOPs are counted analytically, 2*m*n*k per
   matmul or einsum of the forward pass over the T-1 predicted steps:
     encoder      B*L     x D  x E       (x2: no gradient for the features)
     W1 keys      B*L     x E  x U       (x3)
     token input  B*(T-1) x E  x 3U      (x3)
     per step, times T-1:
       W2 query   B       x U  x U       (x3)
       V score    B*L     x U  x 1       (x3)
       context    B       x L  x E       (x3)
       GRU input  B       x E  x 3U      (x3, context half)
       GRU state  B       x U  x 3U      (x3)
     fc1          B*(T-1) x U  x U       (x3)
     fc2          B*(T-1) x U  x V       (x3)
   x3 is forward + gradient of the inputs + gradient of the weights (each as
   costly as the forward); x2 where the inputs need no gradient. Elementwise
   work (tanh, softmax, the loss, Adam) and recomputation are not counted.
   The tutorial's count adds W1 on the features at every step after the
   first; its ratio to capjax's is the training speed-up that equal FLOP/s
   would give, printed under the table.
5. Feature extraction (images/s, no baseline): `patches` on shapes PNGs and
   `inception_v3` (random weights) on 640x480 JPEGs, decoding included.

Devices: capjax runs on JAX's default device (a GPU if there is one).
TensorFlow never sees a GPU here (it must not take accelerator memory from
JAX), so the tutorial baselines always run on the CPU; the table says so.
"""

import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorflow as tf

from capjax import datasets
from capjax import decode
from capjax import features as features_lib
from capjax import input_pipeline
from capjax import models
from capjax import train
from capjax import vocab as vocab_lib
from capjax.configs import default

_REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / 'tests'))
import real_data  # noqa: E402  pylint: disable=g-import-not-at-top
import tf_reference  # noqa: E402  pylint: disable=g-import-not-at-top

_OUT_DIR = flags.DEFINE_string('out_dir', 'benchmark_results',
                               'Where benchmark.json and benchmark.md go.')
_QUICK = flags.DEFINE_bool('quick', False, 'Fewer repeats, no extraction.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per figure '
                                '(2 with --quick).')
_DECODE_LEN = flags.DEFINE_integer('decode_len', 32, 'Tokens per caption.')

# The tutorial's sizes.
_VOCAB_SIZE, _EMBEDDING_DIM, _UNITS = 5001, 256, 512
_NUM_LOCATIONS, _FEATURE_DIM, _BATCH_SIZE = 64, 2048, 64
_TRAIN_LENGTHS = (16, 32, 48)
_EFFICIENCY_LENGTH = 32
_BEAM_SIZE = 3
_TUTORIAL_SHUFFLE = 1000
_CAPTIONS_PER_IMAGE = 5
_PEAK_MATMUL_SIZE = 2048


def interleaved_medians(fns: dict[str, Callable[[], Any]],
                        repeats: int) -> dict[str, float]:
  """Median wall seconds of each fn(), the fns taking turns.

  Each fn is called once untimed first (compilation, tracing, caches); its
  result is waited for, so fns must return device arrays or host values.
  Taking turns exposes every fn to the same changes in machine load.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  seconds = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in seconds.items()}


def _model() -> models.Captioner:
  return models.Captioner(vocab_size=_VOCAB_SIZE, embedding_dim=_EMBEDDING_DIM,
                          units=_UNITS)


def _random_features(rng: np.random.Generator, n: int) -> np.ndarray:
  """Non-negative (n, L, D) float32 grids, like InceptionV3's ReLU outputs."""
  return np.abs(rng.normal(size=(n, _NUM_LOCATIONS, _FEATURE_DIM))).astype(
      np.float32)


def _random_tokens(rng: np.random.Generator, length: int) -> np.ndarray:
  """(B, length) ids of real words, no padding: the cost depends on T only."""
  tokens = rng.integers(vocab_lib.Vocab.end_id + 1, _VOCAB_SIZE,
                        size=(_BATCH_SIZE, length))
  tokens[:, 0] = vocab_lib.Vocab.start_id
  return tokens.astype(np.int32)


# --- 1. Training -------------------------------------------------------------


class CapjaxTrainer:
  """capjax's jitted train step, its state donated and kept between calls."""

  def __init__(self):
    config = default.get_config()
    self.model = _model()
    tx = train.make_optimizer(config)
    self._state = train.create_train_state(
        self.model, tx, (_NUM_LOCATIONS, _FEATURE_DIM), config.seed)
    self._step = jax.jit(
        functools.partial(train.train_step, model=self.model, tx=tx,
                          attention_penalty=0.0), donate_argnums=0)

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    self._state, _ = self._step(self._state, batch)
    return self._state.params


class TutorialTrainer:
  """The tutorial's `train_step`: a tf.function around a loop over tokens."""

  def __init__(self):
    self._encoder, self._decoder = tf_reference.build(
        _VOCAB_SIZE, _EMBEDDING_DIM, _UNITS, _FEATURE_DIM, _NUM_LOCATIONS,
        carry_gru_state=False)
    self._optimizer = tf.keras.optimizers.Adam()
    self._cross_entropy = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction='none')
    # One trace per caption length, as the tutorial's own function retraced.
    self._step = tf.function(self._train_step)

  def _loss(self, targets, logits):
    """The tutorial's loss_function: batch mean of the masked cross-entropy."""
    mask = tf.cast(tf.math.not_equal(targets, 0), tf.float32)
    return tf.reduce_mean(self._cross_entropy(targets, logits) * mask)

  def _train_step(self, features, tokens):
    loss = 0.0
    hidden = self._decoder.reset_state(batch_size=tokens.shape[0])
    dec_input = tokens[:, :1]
    with tf.GradientTape() as tape:
      encoded = self._encoder(features)
      for i in range(1, tokens.shape[1]):
        logits, hidden, _ = self._decoder(dec_input, encoded, hidden)
        loss += self._loss(tokens[:, i], logits)
        dec_input = tokens[:, i:i + 1]
    variables = (self._encoder.trainable_variables
                 + self._decoder.trainable_variables)
    gradients = tape.gradient(loss, variables)
    self._optimizer.apply_gradients(zip(gradients, variables))
    return loss

  def __call__(self, features, tokens) -> np.ndarray:
    return self._step(features, tokens).numpy()


def train_flops(length: int) -> float:
  """Model FLOPs of one train step on captions of `length` tokens (docstring)."""
  b, l, d, e, u, v = (_BATCH_SIZE, _NUM_LOCATIONS, _FEATURE_DIM,
                      _EMBEDDING_DIM, _UNITS, _VOCAB_SIZE)
  steps = length - 1
  per_step = b * u * u + b * l * u + b * l * e + b * e * 3 * u + b * u * 3 * u
  forward_with_input_grads = (b * l * e * u + b * steps * e * 3 * u
                              + steps * per_step + b * steps * u * u
                              + b * steps * u * v)
  return 2 * (2 * b * l * d * e + 3 * forward_with_input_grads)


def tutorial_train_flops(length: int) -> float:
  """The same count for the tutorial, which applies W1 at every step."""
  b, l, e, u = _BATCH_SIZE, _NUM_LOCATIONS, _EMBEDDING_DIM, _UNITS
  return train_flops(length) + 2 * 3 * (length - 2) * b * l * e * u


def flickr8k_train_captions() -> tuple[np.ndarray, np.ndarray] | None:
  """(tokens per Flickr8k training caption with <start> and <end>, its image)."""
  data = real_data.find()
  flickr = data / 'flickr8k' if data else None
  if flickr is None or not (flickr / 'Flickr_8k.trainImages.txt').exists():
    return None
  captions = datasets.read_flickr_tokens(str(flickr / 'Flickr8k.token.txt'))
  names = (flickr / 'Flickr_8k.trainImages.txt').read_text().split()
  pairs = [(len(vocab_lib.tokenize(c)) + 2, i)
           for i, n in enumerate(names) for c in captions.get(n, ())]
  return tuple(np.array(column, np.int32) for column in zip(*pairs))


def bucket_frequencies(lengths: np.ndarray, image_index: np.ndarray,
                       config) -> dict[int, float]:
  """How often each bucket pads capjax's training batches of these captions.

  The batches are those `input_pipeline.TrainBatches` makes with the config's
  batch size, buckets, shuffling and length grouping, over two epochs.
  """
  # Only the lengths decide the batches' shapes: no features or tokens needed.
  examples = input_pipeline.Examples(
      store=None, image_index=image_index,
      tokens=np.zeros((len(lengths), 1), np.int32), lengths=lengths)
  batches = input_pipeline.TrainBatches(
      examples, batch_size=_BATCH_SIZE, seed=config.seed,
      bucket_lengths=config.bucket_lengths,
      shuffle_buffer=config.shuffle_buffer, cache_features=False,
      group_by_length=config.group_by_length)
  steps = 2 * batches.steps_per_epoch
  counts = np.bincount([batches.caption_length(s) for s in range(steps)])
  return {t: float(counts[t] / steps) for t in np.flatnonzero(counts).tolist()}


def bench_training(repeats: int) -> dict[str, Any]:
  """Captions/s of both trainers at fixed lengths and on real lengths."""
  capjax_trainer, tutorial_trainer = CapjaxTrainer(), TutorialTrainer()
  rng = np.random.default_rng(0)
  features = _random_features(rng, _BATCH_SIZE)
  features_jax, features_tf = jnp.asarray(features), tf.constant(features)
  flickr8k = flickr8k_train_captions()
  if flickr8k is None:
    logging.warning('Flickr8k captions not found ($CAPJAX_TEST_DATA or '
                    '../shared/data): skipping the real-lengths row')
    mixes, tutorial_length = {}, None
  else:
    lengths, image_index = flickr8k
    config = default.get_config()
    grouped = config.copy_and_resolve_references()
    grouped.group_by_length = True
    mixes = {name: bucket_frequencies(lengths, image_index, c)
             for name, c in (('flickr8k_lengths', config),
                             ('flickr8k_lengths_grouped', grouped))}
    tutorial_length = int(lengths.max())

  def time_length(length, tutorial=True):
    tokens = _random_tokens(rng, length)
    batch = {'features': features_jax, 'tokens': jnp.asarray(tokens)}
    fns = {'capjax': lambda: capjax_trainer(batch)}
    if tutorial:
      tokens_tf = tf.constant(tokens)
      fns['tutorial'] = lambda: tutorial_trainer(features_tf, tokens_tf)
    logging.info('training, T=%d', length)
    return interleaved_medians(fns, repeats)

  step_s = {t: time_length(t) for t in _TRAIN_LENGTHS}
  results = {'fixed_length': {
      t: {'capjax_captions_per_s': _BATCH_SIZE / s['capjax'],
          'tutorial_captions_per_s': _BATCH_SIZE / s['tutorial'],
          'capjax_step_s': s['capjax'], 'tutorial_step_s': s['tutorial'],
          'capjax_model_flops': train_flops(t)}
      for t, s in step_s.items()}}
  if mixes:
    for t in sorted({t for buckets in mixes.values() for t in buckets}):
      if t not in step_s:
        step_s[t] = time_length(t, tutorial=False)
    tutorial_s = time_length(tutorial_length)['tutorial']
    for name, buckets in mixes.items():
      capjax_s = sum(f * step_s[t]['capjax'] for t, f in buckets.items())
      results[name] = {
          'capjax_captions_per_s': _BATCH_SIZE / capjax_s,
          'tutorial_captions_per_s': _BATCH_SIZE / tutorial_s,
          'capjax_bucket_frequencies': buckets,
          'capjax_bucket_step_s': {t: step_s[t]['capjax'] for t in buckets},
          'tutorial_length': tutorial_length,
          'num_captions': len(lengths),
          'mean_length': float(lengths.mean())}
  return results


def matmul_peak_flops(repeats: int) -> float:
  """Median float32 FLOP/s of a large `jnp.dot` on JAX's default device."""
  n = _PEAK_MATMUL_SIZE
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  dot = jax.jit(jnp.dot)
  # Several products per timing, so that dispatch is negligible on a GPU too.
  seconds = interleaved_medians(
      {'dot': lambda: [dot(a, a) for _ in range(4)]}, max(repeats, 5))['dot']
  return 4 * 2 * n**3 / seconds


# --- 2. Decoding -------------------------------------------------------------


def make_jitted_step_loop(model: models.Captioner, params, max_len: int):
  """The tutorial's `evaluate()` loop around capjax's jitted `decode_step`.

  Returns features_NLD -> tokens_NT: one image at a time, one step call per
  token, the logits read back to the host for the argmax and the <end> check.
  """
  variables = {'params': params}
  encode = jax.jit(functools.partial(model.apply,
                                     method=models.Captioner.encode))
  decode_step = jax.jit(functools.partial(
      model.apply, method=models.Captioner.decode_step))
  banned = [vocab_lib.Vocab.pad_id, vocab_lib.Vocab.start_id]

  def step_loop(features_NLD: np.ndarray) -> np.ndarray:
    tokens_NT = np.zeros((len(features_NLD), max_len), np.int32)
    for n, features_LD in enumerate(features_NLD):
      encoded = encode(variables, features_LD[None])
      h = jnp.zeros((1, model.units))
      token = vocab_lib.Vocab.start_id
      for t in range(max_len):
        logits, h, _ = decode_step(variables, h, jnp.array([token]), encoded)
        # <pad> and <start> are ruled out as capjax rules them out, so both
        # pick the same words.
        logits = np.array(logits[0])
        logits[banned] = -np.inf
        token = int(np.argmax(logits))
        tokens_NT[n, t] = token
        if token == vocab_lib.Vocab.end_id:
          break
    return tokens_NT

  return step_loop


def make_tutorial_evaluate(max_len: int):
  """The tutorial's `evaluate()` (argmax) with its eager Keras decoder.

  Returns features_NLD -> tokens_NT, one image at a time as the tutorial.
  """
  encoder, decoder = tf_reference.build(
      _VOCAB_SIZE, _EMBEDDING_DIM, _UNITS, _FEATURE_DIM, _NUM_LOCATIONS,
      carry_gru_state=False)

  def evaluate(features_NLD: np.ndarray) -> np.ndarray:
    tokens_NT = np.zeros((len(features_NLD), max_len), np.int32)
    for n, features_LD in enumerate(features_NLD):
      hidden = decoder.reset_state(batch_size=1)
      encoded = encoder(features_LD[None])
      dec_input = tf.constant([[vocab_lib.Vocab.start_id]])
      for t in range(max_len):
        predictions, hidden, _ = decoder(dec_input, encoded, hidden)
        predicted_id = int(tf.argmax(predictions[0]))
        tokens_NT[n, t] = predicted_id
        if predicted_id == vocab_lib.Vocab.end_id:
          break
        dec_input = tf.constant([[predicted_id]])
    return tokens_NT

  return evaluate


def bench_decoding(repeats: int, max_len: int, tutorial_images: int) -> dict:
  """Greedy captions/s and latency of capjax and of the tutorial's loops."""
  model = _model()
  features = _random_features(np.random.default_rng(1), _BATCH_SIZE)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), features[:1],
                               jnp.zeros((1, 2), jnp.int32))['params']
  batch, single = jnp.asarray(features), jnp.asarray(features[:1])
  greedy = functools.partial(decode.greedy_captions, params, model=model,
                             max_len=max_len)
  step_loop = make_jitted_step_loop(model, params, max_len)
  evaluate = make_tutorial_evaluate(max_len)
  few = features[:tutorial_images]
  seconds = interleaved_medians({
      'capjax_batch': lambda: greedy(batch).tokens_BT,
      'capjax_single': lambda: greedy(single).tokens_BT,
      'step_loop': lambda: step_loop(few),
      'tutorial': lambda: evaluate(few),
      'beam': lambda: decode.beam_captions(
          params, batch, model=model, max_len=max_len,
          beam_size=_BEAM_SIZE).tokens_BKT,
  }, repeats)
  if not np.array_equal(np.asarray(greedy(batch).tokens_BT)[:len(few)],
                        step_loop(few)):
    raise AssertionError('the per-token loop and capjax disagree on captions')
  per_image = {k: seconds[k] / len(few) for k in ('step_loop', 'tutorial')}
  return {
      'capjax_captions_per_s': _BATCH_SIZE / seconds['capjax_batch'],
      'capjax_latency_ms': 1e3 * seconds['capjax_single'],
      'tutorial_captions_per_s': 1 / per_image['tutorial'],
      'tutorial_latency_ms': 1e3 * per_image['tutorial'],
      'step_loop_captions_per_s': 1 / per_image['step_loop'],
      'step_loop_latency_ms': 1e3 * per_image['step_loop'],
      'beam_captions_per_s': _BATCH_SIZE / seconds['beam'],
      'beam_size': _BEAM_SIZE, 'max_len': max_len,
      'tutorial_images': len(few)}


# --- 3. Input pipeline -------------------------------------------------------


def _random_records(rng: np.random.Generator,
                    num_images: int) -> list[datasets.Record]:
  words = [f'word{i}' for i in range(1000)]
  return [datasets.Record(f'img{i}', None, tuple(
      ' '.join(rng.choice(words, size=rng.integers(8, 20)))
      for _ in range(_CAPTIONS_PER_IMAGE))) for i in range(num_images)]


def _tutorial_batches(npy_dir: str, examples: input_pipeline.Examples):
  """The tutorial's pipeline: a .npy file per image, loaded per caption."""
  names = [os.path.join(npy_dir, f'{i}') for i in examples.image_index]
  tokens = examples.tokens  # the tutorial padded every caption to the longest

  def map_func(img_name, cap):
    img_tensor = np.load(img_name.decode('utf-8') + '.npy')
    return img_tensor, cap

  while True:
    dataset = tf.data.Dataset.from_tensor_slices((names, tokens))
    dataset = dataset.map(
        lambda item1, item2: tf.numpy_function(
            map_func, [item1, item2], [tf.float32, tf.int32]),
        num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.shuffle(_TUTORIAL_SHUFFLE).batch(_BATCH_SIZE)
    dataset = dataset.prefetch(buffer_size=tf.data.AUTOTUNE)
    yield from dataset.as_numpy_iterator()


def _next_batches(iterator, n: int) -> list:
  return [next(iterator) for _ in range(n)]


def bench_pipeline(tmp: str, repeats: int, num_images: int,
                   num_batches: int) -> dict[str, float]:
  """Examples/s of capjax's training batches and of the tutorial's."""
  rng = np.random.default_rng(0)
  grids = rng.normal(size=(num_images, _NUM_LOCATIONS, _FEATURE_DIM)).astype(
      np.float16)
  store = features_lib.write_feature_store(
      os.path.join(tmp, 'store'), grids,
      [f'img{i}' for i in range(num_images)], {'name': 'random'})
  records = _random_records(rng, num_images)
  vocab = vocab_lib.Vocab.build([c for r in records for c in r.captions],
                                _VOCAB_SIZE - 1)
  config = default.get_config()
  examples = input_pipeline.make_examples(store, records, vocab,
                                          config.max_caption_len)
  npy_dir = os.path.join(tmp, 'npy')
  os.makedirs(npy_dir)
  for i in range(num_images):
    # The tutorial saved the float32 InceptionV3 outputs as they were.
    np.save(os.path.join(npy_dir, f'{i}.npy'), grids[i].astype(np.float32))

  iterators = {'tutorial_npy_per_image': _tutorial_batches(npy_dir, examples)}
  for cache in (False, True):
    iterators[f'capjax_cache_{cache}'] = input_pipeline.TrainBatches(
        examples, batch_size=_BATCH_SIZE, seed=0,
        bucket_lengths=config.bucket_lengths,
        shuffle_buffer=config.shuffle_buffer, cache_features=cache).iterator()
  seconds = interleaved_medians(
      {name: functools.partial(_next_batches, it, num_batches)
       for name, it in iterators.items()}, repeats)
  return {name: num_batches * _BATCH_SIZE / s for name, s in seconds.items()}


# --- 5. Feature extraction ---------------------------------------------------


def _extraction_rate(config, split: str, feature_dir: str) -> float:
  extractor = features_lib.make_extractor(config)
  extractor(np.zeros((1, 8, 8, 3), np.uint8))  # build and trace untimed
  start = time.perf_counter()
  store = features_lib.extract_split(config, split, feature_dir, extractor)
  return len(store) / (time.perf_counter() - start)


def _write_jpegs(tmp: str, num_images: int) -> str:
  """Synthetic 640x480 JPEGs and a COCO-format caption file; its split name."""
  image_dir = os.path.join(tmp, 'jpegs')
  os.makedirs(image_dir)
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 200, 640)[None, :, None]
  for i in range(num_images):
    pixels = ramp + rng.integers(0, 55, size=(480, 640, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(
        os.path.join(image_dir, f'{i}.jpg'), quality=90)
  annotations = {
      'images': [{'id': i, 'file_name': f'{i}.jpg'}
                 for i in range(num_images)],
      'annotations': [{'id': i, 'image_id': i, 'caption': 'noise'}
                      for i in range(num_images)]}
  with open(os.path.join(tmp, 'jpegs.json'), 'w') as f:
    json.dump(annotations, f)
  return 'jpegs.json:jpegs'


def bench_extraction(tmp: str, patch_images: int,
                     inception_images: int) -> dict[str, float]:
  """Images/s of the `patches` and `inception_v3` extractors."""
  config = default.get_config()
  config.data_dir = os.path.join(tmp, 'shapes')
  config.shapes.num_train = patch_images
  datasets.load_split(config, 'train')  # generate the PNGs untimed
  results = {'patches': _extraction_rate(config, 'train',
                                         os.path.join(tmp, 'f_patches'))}
  split = _write_jpegs(tmp, inception_images)
  config.dataset, config.data_dir = 'coco_json', tmp
  config.extractor, config.extractor_weights = 'inception_v3', 'none'
  results['inception_v3'] = _extraction_rate(
      config, split, os.path.join(tmp, 'f_inception'))
  return results


# --- Report ------------------------------------------------------------------


def _row(name, capjax, baseline, ratio, target):
  met = '' if target is None else ('yes' if ratio >= target else 'NO')
  return [name, capjax, baseline, f'{ratio:.1f}x',
          '' if target is None else f'>= {target:g}x', met]


def table_rows(report: dict) -> list[list[str]]:
  """[benchmark, capjax, baseline, ratio, target, met] rows of the table."""
  rows = []
  for t, r in report['training']['fixed_length'].items():
    rows.append(_row(
        f'training, T={t} (captions/s)',
        f"{r['capjax_captions_per_s']:.1f}",
        f"{r['tutorial_captions_per_s']:.1f}",
        r['capjax_captions_per_s'] / r['tutorial_captions_per_s'], 2.5))
  for name, batching in (('flickr8k_lengths', 'random batches'),
                         ('flickr8k_lengths_grouped', 'group_by_length')):
    real = report['training'].get(name)
    if not real:
      continue
    buckets = ', '.join(f'{t}: {f:.0%}' for t, f in
                        real['capjax_bucket_frequencies'].items())
    rows.append(_row(
        f'training, Flickr8k lengths, {batching} (captions/s; capjax '
        f"buckets {buckets}; tutorial T={real['tutorial_length']})",
        f"{real['capjax_captions_per_s']:.1f}",
        f"{real['tutorial_captions_per_s']:.1f}",
        real['capjax_captions_per_s'] / real['tutorial_captions_per_s'], 5))
  d = report['decoding']
  rows.append(_row(f"greedy decoding, batch 64, {d['max_len']} tokens "
                   '(captions/s)', f"{d['capjax_captions_per_s']:.1f}",
                   f"{d['tutorial_captions_per_s']:.2f}",
                   d['capjax_captions_per_s'] / d['tutorial_captions_per_s'],
                   100))
  rows.append(_row('greedy decoding, batch 1 (latency ms, lower is better)',
                   f"{d['capjax_latency_ms']:.1f}",
                   f"{d['tutorial_latency_ms']:.0f}",
                   d['tutorial_latency_ms'] / d['capjax_latency_ms'], 20))
  rows.append(_row('greedy decoding, batch 1, vs the per-token loop around '
                   "capjax's jitted step (latency ms)",
                   f"{d['capjax_latency_ms']:.1f}",
                   f"{d['step_loop_latency_ms']:.0f}",
                   d['step_loop_latency_ms'] / d['capjax_latency_ms'], None))
  p = report['pipeline_examples_per_s']
  for cache in (False, True):
    rows.append(_row(f'input pipeline, cache_features={cache} (examples/s)',
                     f"{p[f'capjax_cache_{cache}']:.0f}",
                     f"{p['tutorial_npy_per_image']:.0f}",
                     p[f'capjax_cache_{cache}'] / p['tutorial_npy_per_image'],
                     5))
  e = report['efficiency']
  rows.append([f"train step efficiency, T={e['length']} (model GFLOP/s "
               'vs measured float32 matmul peak)',
               f"{e['achieved_flops'] / 1e9:.1f}",
               f"{e['peak_flops'] / 1e9:.1f}",
               f"{e['achieved_flops'] / e['peak_flops']:.0%}", '>= 50%',
               'yes' if e['achieved_flops'] >= 0.5 * e['peak_flops']
               else 'NO'])
  rows.append([f"tutorial train step efficiency, T={e['length']} (its model "
               'GFLOP/s, W1 applied at every step, vs the same peak)', '',
               f"{e['tutorial_achieved_flops'] / 1e9:.1f}",
               f"{e['tutorial_achieved_flops'] / e['peak_flops']:.0%}", '',
               ''])
  return rows


def markdown(report: dict) -> str:
  """The table, with the settings it was measured with."""
  s = report['settings']
  lines = [
      '| benchmark | capjax | tutorial (TF) | ratio | target | met |',
      '|---|---|---|---|---|---|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in table_rows(report)]
  extraction = report.get('extraction_images_per_s')
  if extraction:
    lines.append('')
    lines.append('Feature extraction (images/s): ' + ', '.join(
        f'{k} {v:.1f}' for k, v in extraction.items()) + '.')
  lines += [
      '',
      f"capjax on {s['jax_device']} (JAX {s['jax']}); the tutorial on the "
      f"CPU (TensorFlow {s['tensorflow']}); {s['cpus']} CPU cores "
      f"({s['processor']}). Medians of {s['repeats']} interleaved runs; "
      'V=5001, E=256, U=512, L=64, D=2048, batch 64. Model FLOPs count the '
      'matmuls only, x3 for forward and backward (x2 for the encoder). '
      'The tutorial does more FLOPs per step than capjax by '
      + ', '.join(f'{tutorial_train_flops(t) / train_flops(t):.2f}x at T={t}'
                  for t in _TRAIN_LENGTHS)
      + ': the training speed-up if both ran at the same FLOP/s.']
  return '\n'.join(lines) + '\n'


def _processor_name() -> str:
  """The CPU's model name where Linux tells it, else the architecture."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.partition(':')[2].strip()
  except OSError:
    pass
  return platform.machine()


def main(argv):
  del argv
  # Before TensorFlow touches a device: it must leave the accelerators to JAX.
  tf.config.set_visible_devices([], 'GPU')
  quick = _QUICK.value
  repeats = 2 if quick else _REPEATS.value
  report = {'training': bench_training(repeats)}
  step_s = report['training']['fixed_length'][_EFFICIENCY_LENGTH]
  report['efficiency'] = {
      'length': _EFFICIENCY_LENGTH,
      'model_flops': train_flops(_EFFICIENCY_LENGTH),
      'achieved_flops': (train_flops(_EFFICIENCY_LENGTH)
                         / step_s['capjax_step_s']),
      'tutorial_model_flops': tutorial_train_flops(_EFFICIENCY_LENGTH),
      'tutorial_achieved_flops': (tutorial_train_flops(_EFFICIENCY_LENGTH)
                                  / step_s['tutorial_step_s']),
      'peak_flops': matmul_peak_flops(repeats)}
  report['decoding'] = bench_decoding(repeats, _DECODE_LEN.value,
                                      tutorial_images=1 if quick else 2)
  with tempfile.TemporaryDirectory() as tmp:
    report['pipeline_examples_per_s'] = bench_pipeline(
        tmp, repeats, num_images=200 if quick else 500,
        num_batches=20 if quick else 100)
    if not quick:
      report['extraction_images_per_s'] = bench_extraction(
          tmp, patch_images=1000, inception_images=64)
  report['settings'] = {
      'quick': quick, 'repeats': repeats, 'cpus': os.cpu_count(),
      'processor': _processor_name(),
      'jax_device': jax.devices()[0].device_kind, 'jax': jax.__version__,
      'tensorflow': tf.__version__}
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'benchmark.json').write_text(json.dumps(report, indent=2) + '\n')
  table = markdown(report)
  (out_dir / 'benchmark.md').write_text(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
