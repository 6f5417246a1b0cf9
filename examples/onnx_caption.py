r"""Captions with an exported capjax model, without capjax: ONNX Runtime only.

  python -m capjax.export --workdir /tmp/coco --out /tmp/coco-onnx
  python examples/onnx_caption.py --artifact /tmp/coco-onnx photo.jpg ...

Prints `IMAGE: caption` per image (with --json, one JSON object per image
with the token ids, log-probability and attention too). Needs only
onnxruntime, NumPy and Pillow: it opens images as capjax does and resizes
them with the arithmetic capjax.data.images.resize_bilinear uses (that of
tf.image.resize), so the graph sees the pixels capjax would, and the
captions are capjax's.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image
from PIL import ImageOps

FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP')
_HIGH_BIT_DEPTH_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def load_image(path: str) -> np.ndarray:
  """An image file as capjax decodes it: 8-bit RGB (H, W, 3), as shown."""
  with Image.open(path, formats=FORMATS) as image:
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_DEPTH_MODES:  # 16-bit grayscale: high byte
      pixels = np.asarray(image, np.uint32) >> 8
      image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), 'L')
    if 'A' in image.getbands() or 'transparency' in image.info:
      image = image.convert('RGBA')
      image = Image.alpha_composite(
        Image.new('RGBA', image.size, (255, 255, 255, 255)), image
      )
    return np.asarray(image.convert('RGB'))


def _taps(in_size: int, out_size: int):
  """(lower, upper, lerp) per output pixel: half-pixel centres, float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  centres = (
    np.arange(out_size, dtype=np.float32) + np.float32(0.5)
  ) * scale - np.float32(0.5)
  floor = np.floor(centres)
  lower = np.maximum(floor, 0).astype(np.intp)
  upper = np.minimum(np.ceil(centres), in_size - 1).astype(np.intp)
  return lower, upper, centres - floor


def resize_bilinear(image_HW3: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to (size, size, 3) float32, as tf.image.resize."""
  top, bottom, y_lerp = _taps(image_HW3.shape[0], size)
  left, right, x_lerp = _taps(image_HW3.shape[1], size)
  y_lerp, x_lerp = y_lerp[:, None, None], x_lerp[None, :, None]

  def along_x(rows):
    left_px = rows[:, left].astype(np.float32)
    right_px = rows[:, right].astype(np.float32)
    return left_px + (right_px - left_px) * x_lerp

  upper, lower = along_x(image_HW3[top]), along_x(image_HW3[bottom])
  return upper + (lower - upper) * y_lerp


class Captioner:
  """An exported artifact: its ONNX graph, vocabulary and metadata."""

  def __init__(self, artifact: str):
    root = pathlib.Path(artifact)
    self.meta = json.loads((root / 'capjax_export.json').read_text())
    if self.meta['model_format'] != 'onnx':
      raise SystemExit(f'{artifact} holds a {self.meta["model_format"]}')
    vocab = json.loads((root / self.meta['tokens']['vocab']).read_text())
    self.words = vocab['tokens']
    self.size = self.meta['preprocessing']['image_size']
    self.session = ort.InferenceSession(
      str(root / self.meta['model']), providers=['CPUExecutionProvider']
    )

  def pixels(self, paths):
    return np.stack([resize_bilinear(load_image(p), self.size) for p in paths])

  def run(self, pixels_BSS3: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's outputs by name: tokens, lengths, log_prob, attention."""
    name = self.meta['inputs'][0]['name']
    names = [o['name'] for o in self.meta['outputs']]
    return dict(zip(names, self.session.run(names, {name: pixels_BSS3})))

  def text(self, tokens_T) -> str:
    """The words up to <end>, without <pad> and <start>."""
    special = self.meta['tokens']
    words = []
    for i in tokens_T:
      if i == special['end']:
        break
      if i not in (special['pad'], special['start']):
        words.append(self.words[i])
    return ' '.join(words)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--artifact', required=True, help='capjax.export --out')
  parser.add_argument('--json', action='store_true', help='print JSON lines')
  parser.add_argument('images', nargs='+')
  args = parser.parse_args()
  captioner = Captioner(args.artifact)
  results = captioner.run(captioner.pixels(args.images))
  for i, path in enumerate(args.images):
    caption = captioner.text(results['tokens'][i])
    if not args.json:
      print(f'{path}: {caption}')
      continue
    n = int(results['lengths'][i])
    print(
      json.dumps(
        {
          'image': path,
          'caption': caption,
          'tokens': results['tokens'][i].tolist(),
          'log_prob': float(results['log_prob'][i]),
          'attention': results['attention'][i, :n].tolist(),
        }
      )
    )
  sys.stdout.flush()


if __name__ == '__main__':
  main()
