"""Hostile and unusual image files: each case's bytes and expected answer.

One list for every entry point's tests (the opener, capjax.sample, feature
extraction and the server), so that they all face the same files.
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image

from capjax.data import images


def png_claiming_size(width: int, height: int) -> bytes:
  """A tiny PNG whose header declares width x height pixels."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (
      struct.pack('>I', len(data))
      + kind
      + data
      + struct.pack('>I', zlib.crc32(kind + data))
    )

  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(b'\x00' * 16))
    + chunk(b'IEND', b'')
  )


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
  """A 40 x 20 JPEG whose EXIF says: turn 90 degrees clockwise to view."""
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation
  return _encoded(
    Image.new('RGB', (40, 20), (200, 30, 30)), 'JPEG', exif=exif.tobytes()
  )


def _animated_gif() -> bytes:
  frames = [Image.new('P', (8, 8), i) for i in (1, 2)]
  for frame, colour in zip(frames, ((255, 0, 0), (0, 0, 255))):
    frame.putpalette([0, 0, 0, *colour, *colour] + [0] * 759)
  return _encoded(frames[0], 'GIF', save_all=True, append_images=frames[1:])


def _sixteen_bit_png() -> bytes:
  ramp = (np.arange(64, dtype=np.uint32) * 1024).reshape(8, 8)
  return _encoded(Image.fromarray(ramp.astype(np.uint16)), 'PNG')


def _transparent_palette_png() -> bytes:
  image = Image.new('P', (4, 4), 0)
  image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  image.putpixel((0, 0), 1)
  return _encoded(image, 'PNG', transparency=0)


def _truncated_jpeg() -> bytes:
  jpeg = _encoded(Image.new('RGB', (32, 24), (40, 120, 200)), 'JPEG')
  return jpeg[: len(jpeg) // 2]


# name -> (makes the file's bytes, the expected (H, W) or error type).
CASES = {
  'bomb.png': (lambda: png_claiming_size(30_000, 30_000), images.ImageTooLarge),
  'truncated.jpg': (_truncated_jpeg, images.UnreadableImage),
  'empty.png': (lambda: b'', images.UnsupportedImage),
  'text.jpg': (lambda: b'not an image at all', images.UnsupportedImage),
  'vector.eps': (
    lambda: b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n',
    images.UnsupportedImage,
  ),
  'cmyk.jpg': (
    lambda: _encoded(Image.new('CMYK', (16, 12), (0, 255, 255, 0)), 'JPEG'),
    (12, 16),
  ),
  'sixteen_bit.png': (_sixteen_bit_png, (8, 8)),
  'palette.png': (_transparent_palette_png, (4, 4)),
  'animated.gif': (_animated_gif, (8, 8)),
  'exif_rotated.jpg': (_exif_rotated_jpeg, (40, 20)),
  # 7000 x 7000: under the 50M-pixel limit, so decoded, however large.
  'huge_but_valid.png': (
    lambda: _encoded(Image.new('L', (7000, 7000), 90), 'PNG'),
    (7000, 7000),
  ),
  'huge.png': (
    lambda: _encoded(Image.new('L', (8000, 8000), 90), 'PNG'),
    images.ImageTooLarge,
  ),
}
REFUSED = sorted(n for n, (_, want) in CASES.items() if isinstance(want, type))
