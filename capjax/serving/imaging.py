"""Decoding untrusted images in bounded threads, with memory checked first.

Decoding is the one per-request cost that grows with what the client sends:
a 100 KB PNG can hold 25 million pixels, which PIL needs about 450 MB and a
second of CPU to decode, and a 1 MB progressive JPEG of 7000 x 7000 pixels
needs 150-300 MB even when decoded at 1/8 scale (its coefficients are kept
for the whole image between scans). So before an image is decoded, its
header gives the memory the decode will take (`decode_bytes`), in the event
loop, and:

- an image over `max_decode_bytes` is refused (413);
- every decode reserves its memory from one budget, `max_decode_bytes` for
  all decodes at once, and waits until it fits;
- small images (the usual photo, or a baseline JPEG, which decodes at a
  reduced scale by draft mode) decode in `workers` threads; large ones in a
  single thread, with at most one more waiting (more get 503), so that they
  are decoded one at a time and never take the small ones' threads;
- when the small images waiting are `max_waiting`, more get 503.

Each thread also shrinks its image to the extractor's input (box-reduced
first when it is over twice the size, as JPEG's draft mode does, then
`Extractor.prepare`), so that only small arrays leave the pool.
"""

import asyncio
from collections.abc import Callable
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import io
import math
import typing

import numpy as np
from PIL import Image
from PIL import JpegImagePlugin

from capjax.data import images
from capjax.serving import requests

# Peak memory of `images.load_image` per decoded pixel, measured with PIL 11
# on 5000x5000 images (RGB PNG 18, RGBA WEBP 27 bytes).
_BYTES_PER_PIXEL = {'WEBP': 28}
_DEFAULT_BYTES_PER_PIXEL = 20


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
  scale it would decode at. A progressive or other multi-scan JPEG (more
  than one start-of-scan marker) also keeps all its DCT coefficients, two
  bytes each, at full size whatever the draft scale.
  """
  try:
    with Image.open(io.BytesIO(data), formats=images.FORMATS) as image:
      width, height = image.size
      coefficients = 0
      if image.format == 'JPEG':
        if data.count(b'\xff\xda') > 1:  # 0xFF in scan data is stuffed
          # Image.open gives a JPEG (its format) as a JpegImageFile.
          jpeg = typing.cast(JpegImagePlugin.JpegImageFile, image)
          coefficients = _jpeg_coefficients(jpeg.layer, width, height)
        image.draft('RGB', (draft_size, draft_size))
      draft_width, draft_height = image.size
      bytes_per_pixel = _BYTES_PER_PIXEL.get(
        image.format or '', _DEFAULT_BYTES_PER_PIXEL
      )
  # What PIL cannot read is refused by `images.load_image`, with its reason.
  except Exception:  # noqa: BLE001
    return None
  return draft_width * draft_height * bytes_per_pixel + 2 * coefficients


def _jpeg_coefficients(
  layers: list[tuple[int, int, int, int]], width: int, height: int
) -> int:
  """How many DCT coefficients a JPEG's components hold (chroma subsampled)."""
  h_max = max(h for _, h, _, _ in layers)
  v_max = max(v for _, _, v, _ in layers)
  return sum(
    math.ceil(width * h / h_max / 8) * 8 * math.ceil(height * v / v_max / 8) * 8
    for _, h, v, _ in layers
  )


class _Budget:
  """Bytes of decode memory, reserved before a decode and freed after it.

  Used in the event loop's thread only.
  """

  def __init__(self, total: int):
    self.total = total
    self.used = 0
    self._waiting: list[asyncio.Future] = []

  async def reserve(self, size: int) -> None:
    while self.used + size > self.total:
      freed = asyncio.get_running_loop().create_future()
      self._waiting.append(freed)
      await freed
    self.used += size

  def free(self, size: int) -> None:
    self.used -= size
    waiting, self._waiting = self._waiting, []
    for freed in waiting:
      if not freed.done():
        freed.set_result(None)


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
      max_decode_bytes: the most memory decoding may take, one image or
        all at once.
      workers: threads for small images.
      max_waiting: the most small images waiting or being decoded.
      small_bytes: the most memory a small image takes to decode; larger
        ones decode one at a time.
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
    self._budget = _Budget(max_decode_bytes)
    # Counted in the event loop's thread only.
    self.waiting = 0
    self.waiting_large = 0

  def close(self) -> None:
    self._small.shutdown(wait=False, cancel_futures=True)
    self._large.shutdown(wait=False, cancel_futures=True)

  def _decode(self, data: bytes) -> np.ndarray:
    """Runs in a pool thread: bytes -> the extractor's input."""
    try:
      image_HW3 = images.load_image(
        data, max_pixels=self._max_pixels, draft_size=self._image_size
      )
    except images.ImageError as e:
      raise requests.RequestError(e.http_status, str(e)) from None
    return self._prepare_fn(box_reduce(image_HW3, self._image_size))

  def _decode_large(self, data: bytes) -> np.ndarray:
    try:
      return self._decode(data)
    finally:
      _release_freed_memory()

  async def _run(
    self,
    pool: concurrent.futures.Executor,
    fn: Callable[[bytes], np.ndarray],
    data: bytes,
    needed: int,
  ) -> np.ndarray:
    """fn(data) in the pool, once `needed` bytes of the budget are free."""
    await self._budget.reserve(needed)
    loop = asyncio.get_running_loop()
    try:
      future = pool.submit(fn, data)
    except RuntimeError:  # the pool is shut down
      self._budget.free(needed)
      raise requests.busy('the server is shutting down') from None

    # Freed when the decode ends, not when a request that gave up stops
    # waiting for it: the thread still holds the memory.
    def freed(_) -> None:
      with contextlib.suppress(RuntimeError):  # the loop has closed
        loop.call_soon_threadsafe(self._budget.free, needed)

    future.add_done_callback(freed)
    try:
      return await asyncio.wrap_future(future)
    except concurrent.futures.CancelledError:
      raise requests.busy('the server is shutting down') from None

  async def prepare(self, data: bytes) -> np.ndarray:
    """The extractor's input (S, S, 3) float32 for an uploaded image.

    Raises:
      RequestError: 400 empty or unreadable, 413 too many pixels or too much
        memory, 415 not an image of images.FORMATS, 503 the pools are full.
    """
    if not data:
      raise requests.RequestError(
        400, 'empty body: send an image (JPEG, PNG, ...)'
      )
    needed = decode_bytes(data, self._image_size)
    if needed is None:
      # Not readable by PIL: load_image refuses it, with its reason.
      needed = _DEFAULT_BYTES_PER_PIXEL
    if needed > self.max_decode_bytes:
      raise requests.RequestError(
        413,
        f'decoding this image would take about {needed / 2**20:,.0f} '
        f'MB, over the limit of {self.max_decode_bytes / 2**20:,.0f} MB',
      )
    if needed <= self._small_bytes:
      if self.waiting >= self._max_waiting:
        raise requests.busy(
          f'{self.waiting} images are being decoded; retry later'
        )
      self.waiting += 1
      try:
        return await self._run(self._small, self._decode, data, needed)
      finally:
        self.waiting -= 1
    # One large image decodes while one more waits; more are refused.
    if self.waiting_large >= 2:
      raise requests.busy(
        'the server is decoding other large images; retry later'
      )
    self.waiting_large += 1
    try:
      return await self._run(self._large, self._decode_large, data, needed)
    finally:
      self.waiting_large -= 1
