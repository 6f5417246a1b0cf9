"""The captioning service: the model, its extractor, the batcher and the limits.

The HTTP layer (capjax.serving.server) parses requests and calls
`Service.caption`, which decodes and resizes the image in the calling
thread, hands it to the batcher and waits for the batch's result.
"""

from collections.abc import Mapping, Sequence
import concurrent.futures
import dataclasses
from typing import Any

import jax
import numpy as np

from capjax import inference
from capjax import plots
from capjax.data import extractors
from capjax.data import images
from capjax.model import decoding
from capjax.serving import batcher as batcher_lib
from capjax.serving import fetch as fetch_lib
from capjax.serving import requests

@dataclasses.dataclass(frozen=True)
class Options:
  """How the service batches and what it accepts.

  Attributes:
    max_batch_size: the most images decoded together.
    max_wait_s: how long the oldest waiting request may wait for others.
    max_queue: the most requests waiting for the decoder.
    max_connections: the most connections served at once.
    max_body_bytes: the largest request body, and the largest fetched image.
    max_pixels: the largest image, width * height.
    max_beam_size: the largest beam_size a request may ask for.
    max_len: the default and largest max_len; None: the config's longest
      caption (`decoding.max_caption_tokens`).
    allow_url_fetch: accept `{"url": ...}` bodies.
    url_timeout_s: the time a URL fetch may take.
    request_timeout_s: the time a request may wait for the decoder.
  """
  max_batch_size: int = 32
  max_wait_s: float = 0.005
  max_queue: int = 64
  max_connections: int = 128
  max_body_bytes: int = 10 * 2**20
  max_pixels: int = 25_000_000
  max_beam_size: int = 8
  max_len: int | None = None
  allow_url_fetch: bool = False
  url_timeout_s: float = 10.0
  request_timeout_s: float = 60.0


def batch_sizes(max_batch_size: int) -> tuple[int, ...]:
  """The sizes batches are padded to: powers of two, and max_batch_size."""
  sizes = [1]
  while sizes[-1] * 2 < max_batch_size:
    sizes.append(sizes[-1] * 2)
  return tuple(sizes + [max_batch_size] if max_batch_size > 1 else sizes)


def caption_batch_fn(trained: inference.TrainedModel,
                     extractor: extractors.Extractor,
                     sizes: Sequence[int]) -> batcher_lib.BatchFn:
  """(requests.DecodeKind, prepared images) -> one caption result per image.

  The batch is padded to the smallest of `sizes` that holds it, so that the
  decoder compiles once per size and kind, not once per batch length.
  """
  words = trained.vocab.words
  grid = list(plots.attention_grid(trained.feature_shape_LD[0]))

  def batch_fn(kind: requests.DecodeKind, images: list[np.ndarray]) -> list[dict]:
    n = len(images)
    size = min(s for s in sizes if s >= n)
    # Copies of a real image, not blanks: decoding stops once every row has
    # ended, and a copy ends with its original.
    images_NSS3 = np.stack(images + images[:1] * (size - n))
    captions = jax.device_get(decoding.caption_features(
        trained.params, extractor.features_fn(images_NSS3),
        model=trained.model, max_len=kind.max_len,
        beam_size=kind.beam_size))
    texts = decoding.texts(captions.tokens_BT[:n], trained.vocab)
    results = []
    for i, text in enumerate(texts):
      length = int(captions.lengths_B[i])
      ids = captions.tokens_BT[i, :length].tolist()
      results.append({
          'caption': text,
          'tokens': [words[t] for t in ids],
          'token_ids': ids,
          'log_prob': float(captions.log_prob_B[i]),
          'beam_size': kind.beam_size,
          'max_len': kind.max_len,
          'attention_grid': grid,
          'attention': np.round(captions.attention_BTL[i, :length],
                                5).tolist(),
      })
    return results

  return batch_fn


class Service:
  """The model, its extractor and the batcher; what the handlers call."""

  def __init__(self, trained: inference.TrainedModel,
               extractor: extractors.Extractor, options: Options,
               batch_fn: batcher_lib.BatchFn | None = None):
    """Makes the service; `start` it.

    Args:
      trained: the model.
      extractor: its feature extractor.
      options: batching and limits.
      batch_fn: replaces `caption_batch_fn` (tests slow it down).
    """
    self.trained = trained
    self.extractor = extractor
    self.options = options
    self.max_len = options.max_len or decoding.max_caption_tokens(
        trained.config)
    self.batch_sizes = batch_sizes(options.max_batch_size)
    self._batch_fn = batch_fn or caption_batch_fn(trained, extractor,
                                                  self.batch_sizes)
    self.batcher = batcher_lib.Batcher(self._batch_fn,
                           max_batch_size=options.max_batch_size,
                           max_wait_s=options.max_wait_s,
                           max_queue=options.max_queue)

  def warm_up(self) -> None:
    """Compiles the default kind's decoder for every batch size."""
    blank = np.zeros((self.extractor.image_size,) * 2 + (3,), np.float32)
    kind = requests.DecodeKind(beam_size=1, max_len=self.max_len)
    for size in self.batch_sizes:
      self._batch_fn(kind, [blank] * size)

  def start(self) -> None:
    self.batcher.start()

  def stop(self) -> None:
    self.batcher.stop()

  def parse_params(
      self, params: Mapping[str, Any]) -> tuple[requests.DecodeKind, bool]:
    return requests.parse_params(
        params, max_beam_size=self.options.max_beam_size,
        max_len=self.max_len)

  def caption(self, image: bytes, kind: requests.DecodeKind) -> dict[str, Any]:
    """The caption of untrusted image bytes; RequestError for bad ones."""
    with self.batcher.expecting():
      prepared = self.extractor.prepare(
          requests.read_image(image, self.options.max_pixels,
                              self.extractor.image_size))
      future = self.batcher.submit(kind, prepared)
    try:
      return future.result(timeout=self.options.request_timeout_s)
    except concurrent.futures.TimeoutError:
      future.cancel()
      raise requests.busy('timed out waiting for the decoder; retry later') from None

  def fetch(self, url: Any) -> bytes:
    """The image at a URL from a request; requests.RequestError if refused or off."""
    if not self.options.allow_url_fetch:
      raise requests.RequestError(403, 'fetching images by URL is off; upload the '
                                  'image, or start the server with --allow_url_fetch')
    if not isinstance(url, str):
      raise requests.RequestError(400, 'send {"url": "http(s)://..."}')
    return fetch_lib.fetch_url(url, max_bytes=self.options.max_body_bytes,
                     timeout_s=self.options.url_timeout_s)

  def model_info(self) -> dict[str, Any]:
    """What GET /v1/model answers."""
    t, o = self.trained, self.options
    num_locations, feature_dim = t.feature_shape_LD
    return {
        'model': {
            'step': t.step,
            'embedding_dim': t.model.embedding_dim,
            'units': t.model.units,
            'carry_gru_state': t.model.carry_gru_state,
            'num_parameters': sum(
                x.size for x in jax.tree_util.tree_leaves(t.params)),
        },
        'vocab': {'size': t.vocab.size},
        'extractor': {
            **t.feature_info['extractor'],
            'image_size': self.extractor.image_size,
            'num_locations': num_locations,
            'feature_dim': feature_dim,
            'attention_grid': list(plots.attention_grid(num_locations)),
        },
        'decoding': {
            'max_len': self.max_len,
            'max_beam_size': o.max_beam_size,
            'max_batch_size': o.max_batch_size,
            'batch_sizes': list(self.batch_sizes),
            'max_wait_ms': o.max_wait_s * 1000,
        },
        'limits': {
            'max_body_bytes': o.max_body_bytes,
            'max_pixels': o.max_pixels,
            'image_formats': list(images.FORMATS),
            'max_queue': o.max_queue,
            'url_fetch': o.allow_url_fetch,
        },
    }
