"""Opening untrusted image files: one function, one set of limits and errors.

Every entry point that reads an image (feature extraction, `capjax.sample`,
`capjax.serve`) calls `load_image`, so all of them refuse the same files the
same way:

- only the formats of `FORMATS`, whose decoders are common and well
  exercised (others that PIL can read, EPS for one, run external programs);
- at most `max_pixels` pixels, read from the header before anything is
  decoded: a 100 KB PNG can declare 30000 x 30000 pixels (a decompression
  bomb) and would need gigabytes decoded;
- truncated, empty and corrupt files raise `UnreadableImage`, never whatever
  a decoder happens to raise.

What is decoded is what a viewer shows: the EXIF orientation is applied,
the first frame of an animation is taken, transparent pixels are composited
onto white, and grayscale, palette, CMYK and 16-bit images become 8-bit RGB.
"""

import io
import os
import pathlib
import re
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from capjax import errors

# Formats that are decoded; PIL's names.
FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP')
# The default largest image, width * height: a 50-megapixel photo.
MAX_PIXELS = 50_000_000

_HIGH_BIT_DEPTH_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')

# PIL warns on opening an image of over 89 M pixels (and refuses one of
# twice that). `load_image` checks every image against its own limit as soon
# as it is opened, so the warning only repeats that check, in PIL's words and
# with PIL's limit.
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)


class ImageError(errors.UserError):
  """An image that cannot be used; `http_status` is what a server answers."""

  http_status = 400


class UnreadableImage(ImageError):
  """Empty, truncated or corrupt image data."""


class ImageTooLarge(ImageError):
  """More pixels than the limit allows."""

  http_status = 413


class UnsupportedImage(ImageError):
  """Not an image, or not in one of `FORMATS`."""

  http_status = 415


def _open(source: str | os.PathLike[str] | bytes) -> Image.Image:
  if isinstance(source, bytes):
    if not source:
      raise UnreadableImage('empty image data')
    return Image.open(io.BytesIO(source), formats=FORMATS)
  return Image.open(pathlib.Path(source), formats=FORMATS)


def _to_rgb(image: Image.Image) -> np.ndarray:
  """A decoded image as viewers show it, 8-bit RGB (H, W, 3)."""
  image = ImageOps.exif_transpose(image)
  if image.mode in _HIGH_BIT_DEPTH_MODES:
    # 16-bit grayscale: keep the high byte (convert('L') would clip).
    pixels = np.asarray(image, np.uint32) >> 8
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), 'L')
  if 'A' in image.getbands() or 'transparency' in image.info:
    image = image.convert('RGBA')
    image = Image.alpha_composite(
      Image.new('RGBA', image.size, (255, 255, 255, 255)), image
    )
  return np.asarray(image.convert('RGB'))


def _too_large(pixels: str, max_pixels: int) -> str:
  return f'image of {pixels} pixels is over the limit of {max_pixels:,} pixels'


def load_image(
  source: str | os.PathLike[str] | bytes,
  *,
  max_pixels: int = MAX_PIXELS,
  draft_size: int | None = None,
) -> np.ndarray:
  """Decodes an image file or its encoded bytes to RGB uint8 (H, W, 3).

  Args:
    source: a file path, or the file's bytes.
    max_pixels: the largest image, width * height, checked from the header.
    draft_size: for JPEG, let the decoder scale down by 2, 4 or 8 while
      both sides stay at least this size: far less memory and time for an
      image that is resized to draft_size anyway, at slightly different
      pixels than a full decode.

  Messages do not name the file: the caller knows which it was.

  Raises:
    UnsupportedImage: not an image, or not of FORMATS.
    ImageTooLarge: over max_pixels.
    UnreadableImage: empty, truncated or corrupt data.
    MissingFileError: no such file.
  """
  try:
    with _open(source) as image:
      width, height = image.size
      if width * height > max_pixels:
        raise ImageTooLarge(_too_large(f'{width}x{height}', max_pixels))
      if draft_size and image.format == 'JPEG':
        image.draft('RGB', (draft_size, draft_size))
      image.load()  # decode now, so that a truncated file fails here
      return _to_rgb(image)
  except ImageError:
    raise
  except FileNotFoundError:
    raise errors.MissingFileError('no such file') from None
  except IsADirectoryError:
    raise UnsupportedImage('a directory, not an image') from None
  except Image.UnidentifiedImageError:
    raise UnsupportedImage(
      f'not an image, or not in a supported format ({", ".join(FORMATS)})'
    ) from None
  except Image.DecompressionBombError as e:
    # PIL refuses it while opening, before capjax sees its size; its message
    # quotes PIL's own limit.
    size = re.search(r'\((\d+) pixels\)', str(e))
    pixels = f'{int(size[1]):,}' if size else 'more'
    raise ImageTooLarge(_too_large(pixels, max_pixels)) from None
  # PIL's decoders raise many types on malformed data: OSError for a
  # truncated file, but also SyntaxError, EOFError, struct.error, ValueError.
  except Exception as e:  # noqa: BLE001
    raise UnreadableImage(
      f'unreadable image ({type(e).__name__}: {e})'
    ) from None


def resize(image_HW3: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to (size, size, 3) float32 in [0, 255], as the tutorial.

  Uses `tf.image.resize` (no antialiasing), which the tutorial applied before
  InceptionV3, so features match the reference pipeline.
  """
  # TensorFlow is imported where it is used: reading a store and the
  # --from_numpy path do not need its seconds of start-up.
  import tensorflow as tf  # noqa: PLC0415

  return tf.image.resize(image_HW3, (size, size)).numpy()


def _bilinear_taps(
  in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower, upper, lerp) of each output pixel, as TF's ResizeBilinear.

  Half-pixel centres, every step in float32 as the kernel does it, so the
  weights are TF's own and not merely close to them.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  centres = (
    np.arange(out_size, dtype=np.float32) + np.float32(0.5)
  ) * scale - np.float32(0.5)
  floor = np.floor(centres)
  lower = np.maximum(floor, 0).astype(np.intp)
  upper = np.minimum(np.ceil(centres), in_size - 1).astype(np.intp)
  return lower, upper, centres - floor


def resize_bilinear(image_HW3: np.ndarray, size: int) -> np.ndarray:
  """`resize` in NumPy: the tutorial's resize where TensorFlow is not loaded.

  tf.image.resize's arithmetic (bilinear, no antialiasing, half-pixel
  centres, float32), step for step: on real photos it equals `resize` bit
  for bit (tests/test_features.py). About 5 ms for a 640x426 photo to 299.
  """
  top, bottom, y_lerp = _bilinear_taps(image_HW3.shape[0], size)
  left, right, x_lerp = _bilinear_taps(image_HW3.shape[1], size)
  y_lerp_S11, x_lerp_1S1 = y_lerp[:, None, None], x_lerp[None, :, None]
  # Rows first, then columns: only the 2 * size rows needed are gathered.
  top_rows, bottom_rows = image_HW3[top], image_HW3[bottom]

  def along_x(rows_SW3):
    left_S3 = rows_SW3[:, left].astype(np.float32)
    right_S3 = rows_SW3[:, right].astype(np.float32)
    return left_S3 + (right_S3 - left_S3) * x_lerp_1S1

  upper_SS3, lower_SS3 = along_x(top_rows), along_x(bottom_rows)
  return upper_SS3 + (lower_SS3 - upper_SS3) * y_lerp_S11
