"""Config files: `default.py`, the offline `shapes` demo, and a loader.

Experiments (experiments/*.py) start from `default.get_config()`; a second
stage starts from its first stage's file with `load`.
"""

import importlib.util
import os
import pathlib

import ml_collections

# The --config of programs that take one, when none is given.
DEFAULT_FILE = str(pathlib.Path(__file__).with_name('default.py'))


def load(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as `--config=path` would give it."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  if spec is None or spec.loader is None:
    raise ValueError(f'{path} is not a Python config file')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
