r"""Benchmarks caption decoding at the tutorial's sizes on this machine.

  python scripts/bench_decode.py [--max_len=25] [--batch_size=64]

Random parameters (vocabulary 5001, E 256, U 512) and random (64, 2048)
features. Random weights never pick <end>, so every caption runs the full
max_len steps in both approaches:

- capjax: `decode.greedy_captions`, one jitted `lax.while_loop` over a batch,
  the encoder and W1 once per image; captions/s at --batch_size and latency
  at batch 1. Beam search (`decode.beam_captions`, --beam_size) at
  --batch_size for reference.
- the tutorial's `evaluate()`: one image at a time, a Python loop calling
  the (jitted) decoder step once per token, reading the logits back to the
  host for the argmax and the <end> check.

Compile time is excluded (one warm-up call each); each figure is the median
of --repeats timed runs. Both approaches must produce the same captions.
Prints one JSON object.
"""

import functools
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from capjax import decode
from capjax import models
from capjax import vocab as vocab_lib

_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 5001, 'V.')
_EMBEDDING_DIM = flags.DEFINE_integer('embedding_dim', 256, 'E.')
_UNITS = flags.DEFINE_integer('units', 512, 'U.')
_NUM_LOCATIONS = flags.DEFINE_integer('num_locations', 64, 'L.')
_FEATURE_DIM = flags.DEFINE_integer('feature_dim', 2048, 'D.')
_MAX_LEN = flags.DEFINE_integer('max_len', 25, 'Tokens per caption.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per batch.')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 3, 'Beam width (0 skips it).')
_TUTORIAL_IMAGES = flags.DEFINE_integer(
    'tutorial_images', 16, 'Images captioned by the per-token loop per run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per figure.')


def _median_seconds(fn, repeats: int) -> float:
  """Median wall time of fn() after one untimed warm-up (compilation)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_tutorial_greedy(model: models.Captioner, params, max_len: int):
  """The tutorial's `evaluate()` for each image: a Python loop over tokens.

  Returns features_NLD -> tokens_NT. The encoder and the decoder step are
  jitted once, here, so that only the loop is timed.
  """
  variables = {'params': params}
  encode = jax.jit(functools.partial(model.apply,
                                     method=models.Captioner.encode))
  decode_step = jax.jit(functools.partial(
      model.apply, method=models.Captioner.decode_step))
  banned = [vocab_lib.Vocab.pad_id, vocab_lib.Vocab.start_id]

  def tutorial_greedy(features_NLD: np.ndarray) -> np.ndarray:
    tokens_NT = np.zeros((len(features_NLD), max_len), np.int32)
    for n, features_LD in enumerate(features_NLD):
      encoded = encode(variables, features_LD[None])
      h = jnp.zeros((1, model.units))
      token = vocab_lib.Vocab.start_id
      for t in range(max_len):
        logits, h, _ = decode_step(variables, h, jnp.array([token]), encoded)
        # The tutorial's host round trip for the argmax. <pad> and <start>
        # are ruled out as capjax rules them out, so both pick the same words.
        logits = np.array(logits[0])
        logits[banned] = -np.inf
        token = int(np.argmax(logits))
        tokens_NT[n, t] = token
        if token == vocab_lib.Vocab.end_id:
          break
    return tokens_NT

  return tutorial_greedy


def main(argv):
  del argv
  max_len, batch_size = _MAX_LEN.value, _BATCH_SIZE.value
  model = models.Captioner(vocab_size=_VOCAB_SIZE.value,
                           embedding_dim=_EMBEDDING_DIM.value,
                           units=_UNITS.value)
  rng = np.random.default_rng(0)
  features_BLD = np.abs(rng.normal(size=(
      batch_size, _NUM_LOCATIONS.value, _FEATURE_DIM.value))).astype(
          np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), features_BLD[:1],
                               jnp.zeros((1, 2), jnp.int32))['params']
  repeats = _REPEATS.value

  greedy = functools.partial(decode.greedy_captions, params, model=model,
                             max_len=max_len)
  batch_s = _median_seconds(lambda: greedy(features_BLD), repeats)
  single_s = _median_seconds(lambda: greedy(features_BLD[:1]), repeats)
  tutorial_greedy = make_tutorial_greedy(model, params, max_len)
  tutorial_features = features_BLD[:_TUTORIAL_IMAGES.value]
  tutorial_s = _median_seconds(lambda: tutorial_greedy(tutorial_features),
                               repeats)
  capjax_tokens = np.asarray(greedy(features_BLD).tokens_BT)
  tutorial_tokens = tutorial_greedy(tutorial_features)
  report = {
      'greedy': {
          'capjax_captions_per_s': batch_size / batch_s,
          'capjax_latency_ms_batch_1': 1e3 * single_s,
          'tutorial_captions_per_s': len(tutorial_features) / tutorial_s,
          'tutorial_latency_ms': 1e3 * tutorial_s / len(tutorial_features),
          'same_captions': bool(np.array_equal(
              capjax_tokens[:len(tutorial_features)], tutorial_tokens)),
          'tokens_per_caption': float(np.mean(np.sum(capjax_tokens != 0,
                                                     axis=1))),
      },
  }
  report['greedy']['throughput_speedup'] = (
      report['greedy']['capjax_captions_per_s']
      / report['greedy']['tutorial_captions_per_s'])
  report['greedy']['latency_speedup'] = (
      report['greedy']['tutorial_latency_ms']
      / report['greedy']['capjax_latency_ms_batch_1'])
  if _BEAM_SIZE.value:
    beam_s = _median_seconds(
        lambda: decode.beam_captions(params, features_BLD, model=model,
                                     max_len=max_len,
                                     beam_size=_BEAM_SIZE.value), repeats)
    report['beam'] = {'beam_size': _BEAM_SIZE.value,
                      'captions_per_s': batch_size / beam_s}
  report['settings'] = {
      'vocab_size': _VOCAB_SIZE.value, 'embedding_dim': _EMBEDDING_DIM.value,
      'units': _UNITS.value,
      'features_LD': [_NUM_LOCATIONS.value, _FEATURE_DIM.value],
      'max_len': max_len, 'batch_size': batch_size,
      'tutorial_images': len(tutorial_features), 'repeats': repeats,
      'device': jax.devices()[0].device_kind, 'cpus': os.cpu_count()}
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  app.run(main)
