"""Greedy decoding: capjax's one jitted loop against the tutorial's evaluate().

Random weights never produce <end>, so every caption runs the full length.
capjax's `decoding.greedy_captions` runs at batch 64 and batch 1; the
tutorial decodes one image at a time, its Keras decoder called eagerly once
per token and the argmax read back to Python. A kinder baseline runs the same
per-token loop around capjax's own jitted `decode_step`; it must produce
capjax's captions. Beam search is listed for reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from capjax.benchmarks import harness
from capjax.benchmarks import tutorial
from capjax.benchmarks import workload
from capjax.data import vocab as vocab_lib
from capjax.model import captioner
from capjax.model import decoding

BEAM_SIZE = 3


def make_jitted_step_loop(model: captioner.Captioner, params, max_len: int):
  """The tutorial's `evaluate()` loop around capjax's jitted `decode_step`.

  Returns features_NLD -> tokens_NT: one image at a time, one step call per
  token, the logits read back to the host for the argmax and the <end> check.
  """
  variables = {'params': params}
  encode = jax.jit(
    functools.partial(model.apply, method=captioner.Captioner.encode)
  )
  decode_step = jax.jit(
    functools.partial(model.apply, method=captioner.Captioner.decode_step)
  )
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


def bench_decoding(repeats: int, max_len: int, tutorial_images: int) -> dict:
  """Greedy captions/s and latency of capjax and of the tutorial's loops."""
  model = workload.model()
  features = workload.random_features(
    np.random.default_rng(1), workload.BATCH_SIZE
  )
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0), features[:1], jnp.zeros((1, 2), jnp.int32)
  )['params']
  batch, single = jnp.asarray(features), jnp.asarray(features[:1])
  greedy = functools.partial(
    decoding.greedy_captions, params, model=model, max_len=max_len
  )
  step_loop = make_jitted_step_loop(model, params, max_len)
  evaluate = tutorial.make_tutorial_evaluate(max_len)
  few = features[:tutorial_images]
  seconds = harness.interleaved_medians(
    {
      'capjax_batch': lambda: greedy(batch).tokens_BT,
      'capjax_single': lambda: greedy(single).tokens_BT,
      'step_loop': lambda: step_loop(few),
      'tutorial': lambda: evaluate(few),
      'beam': lambda: (
        decoding.beam_captions(
          params, batch, model=model, max_len=max_len, beam_size=BEAM_SIZE
        ).tokens_BKT
      ),
    },
    repeats,
  )
  if not np.array_equal(
    np.asarray(greedy(batch).tokens_BT)[: len(few)], step_loop(few)
  ):
    raise AssertionError('the per-token loop and capjax disagree on captions')
  per_image = {k: seconds[k] / len(few) for k in ('step_loop', 'tutorial')}
  return {
    'capjax_captions_per_s': workload.BATCH_SIZE / seconds['capjax_batch'],
    'capjax_latency_ms': 1e3 * seconds['capjax_single'],
    'tutorial_captions_per_s': 1 / per_image['tutorial'],
    'tutorial_latency_ms': 1e3 * per_image['tutorial'],
    'step_loop_captions_per_s': 1 / per_image['step_loop'],
    'step_loop_latency_ms': 1e3 * per_image['step_loop'],
    'beam_captions_per_s': workload.BATCH_SIZE / seconds['beam'],
    'beam_size': BEAM_SIZE,
    'max_len': max_len,
    'tutorial_images': len(few),
  }
