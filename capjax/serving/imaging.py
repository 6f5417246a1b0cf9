"""Decoding untrusted images in bounded threads, with memory checked first.

Decoding is the one per-request cost that grows with what the client sends:
a 100 KB PNG can hold 25 million pixels, which PIL needs about 450 MB and a
second of CPU to decode. So before an image is decoded, its header gives the
memory the decode will take (`decode_bytes`), and the image goes to one of
two pools:

- small images (the usual photo, or any JPEG, which decodes at a reduced
  scale by draft mode) to `workers` threads;
- large ones to a single thread, with at most one more waiting, so that
  they are decoded one at a time and never delay the small ones.

An image that would take more than `max_decode_bytes` is refused (413)
before it is decoded, and when the pools' queues are full requests are
refused (503) without decoding anything. Each thread also shrinks its image
to the extractor's input (box-reduced first when it is over twice the size,
as JPEG's draft mode does, then `Extractor.prepare`), so that only small
arrays leave the pool.
"""

import asyncio
from collections.abc import Callable
import concurrent.futures
import ctypes
import ctypes.util
import io

import numpy as np
from PIL import Image

from capjax.data import images
from capjax.serving import requests

# Peak memory of `images.load_image` per decoded pixel, measured with PIL 11
# on 5000x5000 images (RGB PNG 18, RGBA WEBP 27 bytes).
_BYTES_PER_PIXEL = {'WEBP': 28}
_DEFAULT_BYTES_PER_PIXEL = 20
_LARGE = object()  # an image the small pool passes to the large one


def _malloc_trim() -> Callable[[], None]:
  """glibc's malloc_trim(0), or nothing where there is no glibc."""
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  trim = getattr(libc, 'malloc_trim', None)
  return (lambda: trim(0)) if trim else (lambda: None)


# PIL's image memory comes from malloc in blocks small enough that glibc
# keeps them once freed: a 25-megapixel decode would leave the server's RSS
# 400 MB higher for good. Large decodes give it back.
_release_freed_memory = _malloc_trim()


def decode_bytes(data: bytes, draft_size: int) -> int | None:
  """The memory decoding `data` will take, from its header; None: unknown.

  Nothing is decoded: PIL reads the header, and for a JPEG chooses the draft
  scale it would decode at.
  """
  try:
    with Image.open(io.BytesIO(data), formats=images.FORMATS) as image:
      if image.format == 'JPEG':
        image.draft('RGB', (draft_size, draft_size))
      width, height = image.size
      bytes_per_pixel = _BYTES_PER_PIXEL.get(
        image.format, _DEFAULT_BYTES_PER_PIXEL
      )
  # What PIL cannot read is refused by `images.load_image`, with its reason.
  except Exception:  # noqa: BLE001
    return None
  return width * height * bytes_per_pixel


def box_reduce(image_HW3: np.ndarray, size: int) -> np.ndarray:
  """Averages k x k blocks while both sides stay at least `size` pixels.

  Resizing a large image straight to `size` would sample a few of its pixels
  (the tutorial's resize does not antialias) through a float32 copy of all
  of them; block means are what JPEG's draft mode gives.
  """
  height, width, _ = image_HW3.shape
  k_h, k_w = max(height // size, 1), max(width // size, 1)
  if k_h == k_w == 1:
    return image_HW3
  blocks = image_HW3[: height // k_h * k_h, : width // k_w * k_w].reshape(
    height // k_h, k_h, width // k_w, k_w, 3
  )
  sums = blocks.sum(axis=(1, 3), dtype=np.uint32)
  return ((sums + k_h * k_w // 2) // (k_h * k_w)).astype(np.uint8)


class ImagePool:
  """Turns untrusted image bytes into extractor inputs, in bounded threads."""

  def __init__(
    self,
    prepare_fn: Callable[[np.ndarray], np.ndarray],
    *,
    image_size: int,
    max_pixels: int,
    max_decode_bytes: int,
    workers: int = 2,
    max_waiting: int = 64,
    small_bytes: int = 64 * 2**20,
  ):
    """Makes the pool.

    Args:
      prepare_fn: a decoded image -> the extractor's input
        (`Extractor.prepare`).
      image_size: the extractor's input size.
      max_pixels: the largest image, width * height.
      max_decode_bytes: the most memory one image may take to decode.
      workers: threads for small images.
      max_waiting: the most small images waiting or being decoded.
      small_bytes: the most memory a small image takes to decode.
    """
    self._prepare_fn = prepare_fn
    self._image_size = image_size
    self._max_pixels = max_pixels
    self.max_decode_bytes = max_decode_bytes
    self._small_bytes = min(small_bytes, max_decode_bytes)
    self._max_waiting = max_waiting
    self._small = concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix='decode'
    )
    self._large = concurrent.futures.ThreadPoolExecutor(
      1, thread_name_prefix='decode-large'
    )
    # Counted in the event loop's thread only.
    self.waiting = 0
    self.waiting_large = 0

  def close(self) -> None:
    self._small.shutdown(wait=False, cancel_futures=True)
    self._large.shutdown(wait=False, cancel_futures=True)

  def _decode(self, data: bytes, memory_limit: int) -> np.ndarray | object:
    """Runs in a pool thread: bytes -> the extractor's input, or _LARGE."""
    needed = decode_bytes(data, self._image_size)
    if needed is not None and needed > self.max_decode_bytes:
      raise requests.RequestError(
        413,
        f'decoding this image would take about {needed / 2**20:,.0f} '
        f'MB, over the limit of {self.max_decode_bytes / 2**20:,.0f} MB',
      )
    if needed is not None and needed > memory_limit:
      return _LARGE
    if not data:
      raise requests.RequestError(
        400, 'empty body: send an image (JPEG, PNG, ...)'
      )
    try:
      image_HW3 = images.load_image(
        data, max_pixels=self._max_pixels, draft_size=self._image_size
      )
    except images.ImageError as e:
      raise requests.RequestError(e.http_status, str(e)) from None
    return self._prepare_fn(box_reduce(image_HW3, self._image_size))

  async def prepare(self, data: bytes) -> np.ndarray:
    """The extractor's input (S, S, 3) float32 for an uploaded image.

    Raises:
      RequestError: 400 empty or unreadable, 413 too many pixels or too much
        memory, 415 not an image of images.FORMATS, 503 the pools are full.
    """
    loop = asyncio.get_running_loop()
    if self.waiting >= self._max_waiting:
      raise requests.busy(
        f'{self.waiting} images are being decoded; retry later'
      )
    self.waiting += 1
    try:
      prepared = await loop.run_in_executor(
        self._small, self._decode, data, self._small_bytes
      )
    except RuntimeError:  # the pool is shut down
      raise requests.busy('the server is shutting down') from None
    finally:
      self.waiting -= 1
    if prepared is not _LARGE:
      return prepared
    # One large image decodes while one more waits; more are refused.
    if self.waiting_large >= 2:
      raise requests.busy(
        'the server is decoding other large images; retry later'
      )
    self.waiting_large += 1
    try:
      return await loop.run_in_executor(self._large, self._decode_large, data)
    except RuntimeError:
      raise requests.busy('the server is shutting down') from None
    finally:
      self.waiting_large -= 1

  def _decode_large(self, data: bytes) -> np.ndarray:
    try:
      return self._decode(data, self.max_decode_bytes)
    finally:
      _release_freed_memory()
