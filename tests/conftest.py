"""Shared test fixtures."""

import os
import pathlib

import pytest

_SHARED_DATA_ENV = 'CAPJAX_TEST_DATA'


def _find_shared_data() -> pathlib.Path | None:
  """The real test images and captions, from $CAPJAX_TEST_DATA or ../shared/data."""
  candidates = []
  if os.environ.get(_SHARED_DATA_ENV):
    candidates.append(pathlib.Path(os.environ[_SHARED_DATA_ENV]))
  repo_root = pathlib.Path(__file__).resolve().parent.parent
  candidates.append(repo_root.parent / 'shared' / 'data')
  for path in candidates:
    if (path / 'coco-mini').is_dir():
      return path
  return None


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """Directory of real COCO/Flickr8k test data; skips the test when absent."""
  path = _find_shared_data()
  if path is None:
    pytest.skip(
        f'real test data not found: set {_SHARED_DATA_ENV} to a directory '
        'holding coco-mini/, flickr8k/ and flickr8k-1k/')
  return path
