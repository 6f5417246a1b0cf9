"""Decoding image files into RGB pixels, and resizing them as the tutorial did."""

import io

import numpy as np
from PIL import Image


def load_image(source: str | bytes) -> np.ndarray:
  """Decodes an image file or its encoded bytes to RGB uint8 (H, W, 3).

  Grayscale, palette and CMYK images are converted to RGB; transparent ones
  are composited onto white (how viewers show them).

  Raises:
    OSError, ValueError: unreadable, truncated or non-image data
      (PIL.UnidentifiedImageError is an OSError).
  """
  with Image.open(io.BytesIO(source) if isinstance(source, bytes)
                  else source) as image:
    image.load()  # decode now, so that a truncated file fails here
    if 'A' in image.getbands() or 'transparency' in image.info:
      image = image.convert('RGBA')
      image = Image.alpha_composite(
          Image.new('RGBA', image.size, (255, 255, 255, 255)), image)
    return np.asarray(image.convert('RGB'))


def resize(image_HW3: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to (size, size, 3) float32 in [0, 255], as the tutorial.

  Uses `tf.image.resize` (no antialiasing), which the tutorial applied before
  InceptionV3, so features match the reference pipeline.
  """
  # TensorFlow is imported where it is used: reading a store and the
  # --from_numpy path do not need its seconds of start-up.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.image.resize(image_HW3, (size, size)).numpy()
