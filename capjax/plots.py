"""Attention plots: where the model looked for each word of a caption."""

from collections.abc import Sequence
import math
import os
import pathlib

import numpy as np


def attention_grid(num_positions: int) -> tuple[int, int]:
  """The (rows, cols) of L feature positions: a square grid, else one row.

  Feature grids are flattened row-major (InceptionV3's 8 x 8, the patches
  extractor's n x n), so a square L is that grid again.
  """
  side = math.isqrt(num_positions)
  if side * side == num_positions:
    return side, side
  return 1, num_positions


def panel_layout(num_panels: int) -> tuple[int, int]:
  """(rows, cols) of the smallest near-square grid with num_panels cells.

  Computed from the count, so any caption length fits (the tutorial's fixed
  layout failed on odd ones).
  """
  cols = max(1, math.ceil(math.sqrt(num_panels)))
  return max(1, math.ceil(num_panels / cols)), cols


def plot_attention(
  path: str | os.PathLike[str],
  words: Sequence[str],
  attention_TL: np.ndarray,
  image_HW3: np.ndarray | None = None,
) -> None:
  """Writes a PNG: the image, then one panel per word with its attention map.

  Args:
    path: the PNG to write.
    words: the caption's words; word t was generated with attention_TL[t].
    attention_TL: attention weights, at least len(words) rows.
    image_HW3: the image, under the maps; None (e.g. precomputed features)
      shows the maps alone.
  """
  if len(attention_TL) < len(words):
    raise ValueError(
      f'{len(words)} words but attention for only {len(attention_TL)}'
    )
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # noqa: PLC0415

  grid = attention_grid(attention_TL.shape[-1])
  rows, cols = panel_layout(1 + len(words))
  fig, axes = plt.subplots(
    rows, cols, figsize=(2.5 * cols, 2.5 * rows), squeeze=False
  )
  for ax in axes.flat:
    ax.axis('off')
  fig.suptitle(' '.join(words), fontsize=9)
  if image_HW3 is not None:
    axes.flat[0].imshow(image_HW3)
  for ax, word, weights_L in zip(axes.flat[1:], words, attention_TL):
    ax.set_title(word)
    weights = np.asarray(weights_L, np.float32).reshape(grid)
    if image_HW3 is None:
      ax.imshow(weights, cmap='viridis')
    else:
      shown = ax.imshow(image_HW3)
      # Stretched over the image's extent: each cell covers its region.
      ax.imshow(
        weights,
        cmap='gray',
        alpha=0.6,
        extent=shown.get_extent(),
        interpolation='bilinear',
      )
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_path(
  plot_dir: str | os.PathLike[str], path: str, taken: set[str]
) -> pathlib.Path:
  """`<plot_dir>/<file stem>.png`, numbered when two inputs share a stem."""
  stem = pathlib.Path(path).stem
  name, n = f'{stem}.png', 1
  while name in taken:
    n += 1
    name = f'{stem}-{n}.png'
  taken.add(name)
  return pathlib.Path(plot_dir) / name
