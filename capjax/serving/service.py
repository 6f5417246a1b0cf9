"""The captioning service: the model, its extractor, image pool and batcher.

The HTTP layer (capjax.serving.app) reads and checks a request, then awaits
`Service.caption`, which is where an asyncio request meets the batch worker
thread:

  image = await pool.prepare(data)        # decode + resize in a pool thread
  future = batcher.submit(kind, image)    # hand it to the batch worker
  finished = await asyncio.wrap_future(future)

The worker extracts the features of all the images it admits at once and
decodes them together (capjax.serving.batcher); `Service.answer` turns the
result into the API's JSON fields.
"""

import asyncio
from collections.abc import Callable, Hashable, Mapping, Sequence
import concurrent.futures
import dataclasses
import time
from typing import Any, cast

import jax
import numpy as np

from capjax import inference
from capjax import plots
from capjax.data import extractors
from capjax.data import images
from capjax.model import decoding
from capjax.serving import batcher as batcher_lib
from capjax.serving import continuous
from capjax.serving import fetch as fetch_lib
from capjax.serving import imaging
from capjax.serving import metrics as metrics_lib
from capjax.serving import requests

# Beam search batches are padded to these sizes (capped by max_batch_size):
# beam requests are rarer, and each size is compiled for every beam size
# and max_len bucket.
_BEAM_BATCH_SIZES = (1, 4)
_FETCH_THREADS = 4
# URL fetches running or waiting; more are refused (503).
_MAX_FETCHES = 16


@dataclasses.dataclass(frozen=True)
class Options:
  """How the service batches and what it accepts.

  Attributes:
    max_batch_size: the most images decoded together.
    max_wait_s: how long a beam search request may wait for others.
    max_queue: the most requests waiting for the decoder, and the most
      images waiting to be decoded.
    max_body_bytes: the largest request body, and the largest fetched image.
    max_pixels: the largest image, width * height.
    max_decode_bytes: the most memory decoding one image may take.
    decode_workers: threads decoding small images.
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
  max_body_bytes: int = 10 * 2**20
  max_pixels: int = images.MAX_PIXELS
  max_decode_bytes: int = 512 * 2**20
  decode_workers: int = 2
  max_beam_size: int = 4
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


class GreedyDecoder:
  """The continuous decoder of greedy requests (`batcher.Continuous`).

  Items are prepared images; features are extracted for all the images
  admitted at once.
  """

  def __init__(
    self,
    trained: inference.TrainedModel,
    extractor: extractors.Extractor,
    max_len: int,
    sizes: Sequence[int],
  ):
    self._extractor = extractor
    self._rows = continuous.GreedyRows(
      trained.model, trained.params, trained.feature_shape_LD, max_len, sizes
    )

  @property
  def room(self) -> int:
    return self._rows.room

  @property
  def active(self) -> int:
    return self._rows.active

  def admit(
    self,
    keys: Sequence[Any],
    kinds: Sequence[Hashable],
    items: Sequence[np.ndarray],
  ) -> None:
    features = self._extractor.features_fn(np.stack(items))
    # The batcher's kinds are the service's DecodeKinds.
    max_lens = [cast(requests.DecodeKind, kind).max_len for kind in kinds]
    self._rows.admit(keys, np.asarray(features, np.float32), max_lens)

  def step(self) -> list[tuple[Any, continuous.Finished]]:
    return self._rows.step()

  def abandon(self) -> list[Any]:
    return self._rows.abandon()

  def warm_up(self, stop: Callable[[], bool]) -> None:
    self._rows.warm_up(stop)


def beam_batch_fn(
  trained: inference.TrainedModel,
  extractor: extractors.Extractor,
  sizes: Sequence[int],
) -> batcher_lib.BatchFn:
  """(a beam search DecodeKind, prepared images) -> a Finished per image.

  The batch is padded to the smallest of `sizes` that holds it, so that the
  decoder compiles once per size and kind, not once per batch length.
  """

  def batch_fn(
    kind: Hashable, images_NSS3: list[np.ndarray]
  ) -> list[continuous.Finished]:
    # The batcher's kinds are the service's DecodeKinds.
    decode_kind = cast(requests.DecodeKind, kind)
    n = len(images_NSS3)
    size = min(s for s in sizes if s >= n)
    # Copies of a real image, not blanks: decoding stops once every row has
    # ended, and a copy ends with its original.
    padded = np.stack(images_NSS3 + images_NSS3[:1] * (size - n))
    captions = jax.device_get(
      decoding.caption_features(
        trained.params,
        # A numpy array, which the jitted decoders take as they do an Array.
        cast(jax.Array, np.asarray(extractor.features_fn(padded), np.float32)),
        model=trained.model,
        max_len=decode_kind.max_len,
        beam_size=decode_kind.beam_size,
      )
    )
    return [
      continuous.Finished(
        token_ids=captions.tokens_BT[i, : captions.lengths_B[i]].tolist(),
        attention_TL=captions.attention_BTL[i, : captions.lengths_B[i]],
        log_prob=float(captions.log_prob_B[i]),
      )
      for i in range(n)
    ]

  return batch_fn


class Service:
  """The model, its extractor, the image pool and the batcher."""

  def __init__(
    self,
    trained: inference.TrainedModel,
    extractor: extractors.Extractor,
    options: Options,
    *,
    metrics: metrics_lib.Metrics | None = None,
    greedy: batcher_lib.Continuous | None = None,
  ):
    """Makes the service; `start` it.

    Args:
      trained: the model.
      extractor: its feature extractor.
      options: batching and limits.
      metrics: where the service counts.
      greedy: replaces the `GreedyDecoder` (tests hold it back).
    """
    self.trained = trained
    self.extractor = extractor
    self.options = options
    self.metrics = metrics or metrics_lib.Metrics()
    self.max_len = options.max_len or decoding.max_caption_tokens(
      trained.config
    )
    self.batch_sizes = batch_sizes(options.max_batch_size)
    self.beam_batch_sizes = tuple(
      sorted({min(s, options.max_batch_size) for s in _BEAM_BATCH_SIZES})
    )
    self._greedy = greedy or GreedyDecoder(
      trained, extractor, self.max_len, self.batch_sizes
    )
    self._beam_fn = beam_batch_fn(trained, extractor, self.beam_batch_sizes)
    self.batcher = batcher_lib.Batcher(
      self._greedy,
      self._beam_fn,
      is_continuous=lambda kind: cast(requests.DecodeKind, kind).beam_size == 1,
      max_batch_size=self.beam_batch_sizes[-1],
      max_wait_s=options.max_wait_s,
      max_queue=options.max_queue,
      warm_up=self._warm_up,
      metrics=self.metrics,
    )
    self.pool = imaging.ImagePool(
      extractor.prepare,
      image_size=extractor.image_size,
      max_pixels=options.max_pixels,
      max_decode_bytes=options.max_decode_bytes,
      workers=options.decode_workers,
      max_waiting=options.max_queue,
    )
    self._fetch_pool = concurrent.futures.ThreadPoolExecutor(
      _FETCH_THREADS, thread_name_prefix='fetch'
    )
    self._fetching = 0
    self._draining = False
    self.metrics.watch(
      lambda: self.batcher.queue_size,
      lambda: self.pool.waiting + self.pool.waiting_large,
      lambda: self.ready,
    )

  @property
  def ready(self) -> bool:
    """Warmed up, and not shutting down."""
    return self.batcher.ready and not self._draining

  def _warm_up(self) -> None:
    """Compiles every decoder shape a request can need (in the worker)."""
    stop = lambda: self.batcher.stopping
    self._greedy.warm_up(stop)
    blank = np.zeros((self.extractor.image_size,) * 2 + (3,), np.float32)
    for beam_size in range(2, self.options.max_beam_size + 1):
      for max_len in requests.max_len_buckets(self.max_len):
        for size in self.beam_batch_sizes:
          if stop():
            return
          self._beam_fn(requests.DecodeKind(beam_size, max_len), [blank] * size)

  def start(self, on_ready: Callable[[], None] | None = None) -> None:
    """Starts the worker: it warms up, calls on_ready, then takes requests."""
    self.batcher.start(on_ready)

  def drain(self, seconds: float) -> None:
    """Shutting down: what still waits for the decoder in `seconds` fails."""
    self._draining = True
    self.batcher.drain(seconds)

  def stop(self) -> None:
    self._draining = True
    self.batcher.stop()
    self.pool.close()
    self._fetch_pool.shutdown(wait=False, cancel_futures=True)

  def parse_params(
    self, params: Mapping[str, Any]
  ) -> tuple[requests.DecodeKind, bool]:
    return requests.parse_params(
      params, max_beam_size=self.options.max_beam_size, max_len=self.max_len
    )

  async def caption(
    self, data: bytes, kind: requests.DecodeKind
  ) -> continuous.Finished:
    """The caption of untrusted image bytes; RequestError for bad ones."""
    if not self.batcher.ready:
      raise requests.busy('the server is warming up; retry later')
    start = time.monotonic()
    image = await self.pool.prepare(data)
    self.metrics.phase['image'].observe(time.monotonic() - start)
    future = self.batcher.submit(kind, image)
    try:
      # Cancelling the wrapper (the wait timed out, or the server stops the
      # request) cancels the future, and the worker skips it.
      finished = await asyncio.wait_for(
        asyncio.wrap_future(future), self.options.request_timeout_s
      )
    except TimeoutError:
      raise requests.busy(
        'timed out waiting for the decoder; retry later'
      ) from None
    return finished

  def answer(
    self,
    kind: requests.DecodeKind,
    finished: continuous.Finished,
    attention: bool,
  ) -> dict[str, Any]:
    """What POST /v1/captions answers for a caption."""
    words = self.trained.vocab.words
    answer = {
      'caption': self.trained.vocab.decode(finished.token_ids),
      'tokens': [words[t] for t in finished.token_ids],
      'token_ids': finished.token_ids,
      'log_prob': finished.log_prob,
      'beam_size': kind.beam_size,
      'max_len': kind.max_len,
    }
    if attention:
      answer['attention_grid'] = list(
        plots.attention_grid(self.trained.feature_shape_LD[0])
      )
      answer['attention'] = np.round(finished.attention_TL, 5).tolist()
    return answer

  async def fetch(self, url: Any) -> bytes:
    """The image at a URL from a request; RequestError if refused or off."""
    if not self.options.allow_url_fetch:
      raise requests.RequestError(
        403,
        'fetching images by URL is off; upload the image, or start '
        'the server with --allow_url_fetch',
      )
    if not isinstance(url, str):
      raise requests.RequestError(400, 'send {"url": "http(s)://..."}')
    if self._fetching >= _MAX_FETCHES:
      raise requests.busy('too many URLs being fetched; retry later')
    self._fetching += 1
    try:
      return await asyncio.get_running_loop().run_in_executor(
        self._fetch_pool,
        lambda: fetch_lib.fetch_url(
          url,
          max_bytes=self.options.max_body_bytes,
          timeout_s=self.options.url_timeout_s,
        ),
      )
    finally:
      self._fetching -= 1

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
          x.size for x in jax.tree_util.tree_leaves(t.params)
        ),
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
        'beam_max_len_buckets': list(requests.max_len_buckets(self.max_len)),
        'max_batch_size': o.max_batch_size,
        'batch_sizes': list(self.batch_sizes),
        'beam_batch_sizes': list(self.beam_batch_sizes),
        'max_wait_ms': o.max_wait_s * 1000,
      },
      'limits': {
        'max_body_bytes': o.max_body_bytes,
        'max_pixels': o.max_pixels,
        'max_decode_bytes': o.max_decode_bytes,
        'image_formats': list(images.FORMATS),
        'max_queue': o.max_queue,
        'url_fetch': o.allow_url_fetch,
      },
    }
