"""Where the real COCO/Flickr8k test data lives, if anywhere.

Shared by the test fixtures and the benchmarks.
"""

import os
import pathlib

ENV = 'CAPJAX_TEST_DATA'


def find() -> pathlib.Path | None:
  """The real test images and captions: $CAPJAX_TEST_DATA or ../shared/data."""
  candidates = []
  if os.environ.get(ENV):
    candidates.append(pathlib.Path(os.environ[ENV]))
  repo_root = pathlib.Path(__file__).resolve().parents[2]
  candidates.append(repo_root.parent / 'shared' / 'data')
  for path in candidates:
    if (path / 'coco-mini').is_dir():
      return path
  return None
