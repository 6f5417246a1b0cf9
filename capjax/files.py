"""Atomic file writes: a reader (or a rerun after a crash) never sees half a file."""

import json
import os
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it."""
  tmp = f'{os.fspath(path)}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike[str], value: Any,
                      **dump_kwargs) -> None:
  """`json.dumps(value, **dump_kwargs)` written atomically."""
  write_text_atomic(path, json.dumps(value, **dump_kwargs))
