"""The function an artifact holds: pixels (or features) -> captions, in JAX.

It is the function `capjax.sample` computes, closed over the checkpoint's
parameters: the extractor, the encoder and `decoding`'s jitted greedy or
beam search, so the exported loop is the one capjax runs and cannot drift
from it.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from capjax import errors
from capjax.exporting import extractor as extractor_lib
from capjax.model import captioner
from capjax.model import decoding

Array = jax.Array

PIXELS = 'pixels'
FEATURES = 'features'
# The outputs, in order: search.Captions' fields.
OUTPUTS = ('tokens', 'lengths', 'log_prob', 'attention')


@dataclasses.dataclass(frozen=True)
class Search:
  """The decoding an artifact runs.

  Attributes:
    max_len: the most tokens per caption, <end> included.
    beam_size: 1 for greedy search, > 1 for beam search.
    alpha: beam search's length normalisation.
  """

  max_len: int
  beam_size: int = 1
  alpha: float = 0.0

  def __post_init__(self):
    if self.beam_size < 1:
      raise errors.UserError(f'beam_size must be >= 1, got {self.beam_size}')
    if self.max_len < 1:
      raise errors.UserError(f'max_len must be >= 1, got {self.max_len}')
    if self.alpha < 0:
      raise errors.UserError(f'alpha must be >= 0, got {self.alpha}')

  def describe(self) -> dict:
    name = 'greedy' if self.beam_size == 1 else 'beam'
    return {
      'name': name,
      'beam_size': self.beam_size,
      'alpha': self.alpha,
      'max_len': self.max_len,
    }


CaptionsFn = Callable[[Array], tuple[Array, Array, Array, Array]]


def features_fn(
  model: captioner.Captioner, params: Any, search: Search
) -> CaptionsFn:
  """features_BLD -> (tokens_BT, lengths_B, log_prob_B, attention_BTL)."""

  # Traced afresh, unjitted: jit would cache the trace the converter makes
  # under its patches of jax.numpy and Flax, and later calls would reuse it.
  def captions_fn(features_BLD):
    if search.beam_size > 1:
      captions = decoding.beam_captions.__wrapped__(
        params,
        features_BLD,
        model=model,
        max_len=search.max_len,
        beam_size=search.beam_size,
        alpha=search.alpha,
      ).best()
    else:
      captions = decoding.greedy_captions.__wrapped__(
        params,
        features_BLD,
        model=model,
        max_len=search.max_len,
      )
    return (
      captions.tokens_BT,
      captions.lengths_B,
      captions.log_prob_B,
      captions.attention_BTL,
    )

  return captions_fn


def pixels_fn(
  model: captioner.Captioner,
  params: Any,
  search: Search,
  extractor: extractor_lib.GraphExtractor,
) -> CaptionsFn:
  """pixels_BSS3 float32 in [0, 255], resized -> the captions' four arrays."""
  decode = features_fn(model, params, search)

  def captions_fn(pixels_BSS3):
    return decode(extractor.features_fn(pixels_BSS3.astype(jnp.float32)))

  return captions_fn
