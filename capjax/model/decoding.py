"""Captions for feature grids: the search algorithms run on the Captioner.

  captions = decoding.caption_features(params, features_BLD, model=model,
                                       max_len=20, beam_size=3)
  texts = vocab.decode_rows(captions.tokens_BT)

Each entry point is jitted once per (model, max_len, batch shape); the encoder
and W1 run once per image, before the search loop (capjax.model.search).
"""

import functools
from typing import Any, TYPE_CHECKING

import jax

from capjax.model import captioner
from capjax.model import recurrence
from capjax.model import search

# Configs are only read here: ml_collections, absent on hosts that run the
# model alone, is needed by type checkers only.
if TYPE_CHECKING:
  import ml_collections

Array = jax.Array


def max_caption_tokens(config: 'ml_collections.ConfigDict') -> int:
  """The default max_len: the longest caption trained on, less <start>."""
  return config.max_caption_len - 1


def model_step_fn(model: captioner.Captioner, params: Any) -> search.StepFn:
  """The step closure of a Captioner: its `decode_step`."""

  def step_fn(h_xU, token_x, encoded):
    return model.apply(
      {'params': params},
      h_xU,
      token_x,
      encoded,
      method=captioner.Captioner.decode_step,
    )

  return step_fn


def encode(
  model: captioner.Captioner, params: Any, features_BLD: Array
) -> tuple[recurrence.Encoded, Array]:
  """Encoder outputs and W1 keys (once per image) and the initial state."""
  if features_BLD.ndim != 3:
    raise ValueError(
      f'expected features (B, L, D), got shape {features_BLD.shape}'
    )
  variables = {'params': params}
  encoded = model.apply(
    variables, features_BLD, method=captioner.Captioner.encode
  )
  h_BU = model.apply(
    variables, features_BLD.shape[0], method=captioner.Captioner.initial_state
  )
  return encoded, h_BU  # type: ignore[return-value]


@functools.partial(jax.jit, static_argnames=('model', 'max_len'))
def greedy_captions(
  params: Any, features_BLD: Array, *, model: captioner.Captioner, max_len: int
) -> search.Captions:
  """Greedy search, compiled once per (model, max_len, features shape)."""
  encoded, h_BU = encode(model, params, features_BLD)
  return search.greedy_search(
    model_step_fn(model, params), encoded, h_BU, max_len=max_len
  )


@functools.partial(jax.jit, static_argnames=('model', 'max_len'))
def sampled_captions(
  params: Any,
  features_BLD: Array,
  rng: Array,
  temperature: float | Array,
  *,
  model: captioner.Captioner,
  max_len: int,
) -> search.Captions:
  """Temperature sampling; any temperature runs the same compiled loop."""
  encoded, h_BU = encode(model, params, features_BLD)
  return search.temperature_sampling(
    model_step_fn(model, params),
    encoded,
    h_BU,
    rng,
    max_len=max_len,
    temperature=temperature,
  )


@functools.partial(jax.jit, static_argnames=('model', 'max_len', 'beam_size'))
def beam_captions(
  params: Any,
  features_BLD: Array,
  *,
  model: captioner.Captioner,
  max_len: int,
  beam_size: int,
  alpha: float | Array = 0.0,
) -> search.Beams:
  """Beam search; any alpha runs the same compiled loop."""
  encoded, h_BU = encode(model, params, features_BLD)
  return search.beam_search(
    model_step_fn(model, params),
    encoded,
    h_BU,
    max_len=max_len,
    beam_size=beam_size,
    alpha=alpha,
  )


def caption_features(
  params: Any,
  features_BLD: Array,
  *,
  model: captioner.Captioner,
  max_len: int,
  beam_size: int = 1,
  alpha: float = 0.0,
  temperature: float = 0.0,
  rng: Array | None = None,
) -> search.Captions:
  """One caption per image: greedy, beam search (beam_size > 1) or sampled.

  Args:
    params: the Captioner's parameters.
    features_BLD: image feature grids.
    model: the Captioner.
    max_len: the most tokens per caption, <end> included.
    beam_size: > 1 for beam search.
    alpha: beam search's length normalisation.
    temperature: > 0 samples (needs rng); 0 decodes deterministically.
    rng: the sampling key.
  """
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if alpha < 0:
    # Checked here: under jit, beam_search's own check cannot see the value.
    raise ValueError(f'alpha must be >= 0, got {alpha}')
  if temperature > 0:
    if beam_size != 1:
      raise ValueError(
        'sample (temperature > 0) or search (beam_size > 1), not both'
      )
    if rng is None:
      raise ValueError('sampling (temperature > 0) needs an rng')
    return sampled_captions(
      params, features_BLD, rng, temperature, model=model, max_len=max_len
    )
  if beam_size > 1:
    return beam_captions(
      params,
      features_BLD,
      model=model,
      max_len=max_len,
      beam_size=beam_size,
      alpha=alpha,
    ).best()
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  return greedy_captions(params, features_BLD, model=model, max_len=max_len)
