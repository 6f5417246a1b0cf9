"""Reading and writing the small JSON and text files capjax keeps.

Writes are atomic: a reader, or a rerun after a crash, never sees half a
file. Reads name the file in every error.
"""

import json
import os
import pathlib
from typing import Any
import uuid

from capjax import errors

PathLike = str | os.PathLike[str]


def write_text_atomic(path: PathLike, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it.

  The temporary name is unique, so that processes writing the same file at
  once (every host of a job caching the same captions) never mix their
  bytes: the last rename wins, whole.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f'{path.name}.{uuid.uuid4().hex}.tmp')
  try:
    tmp.write_text(text, encoding='utf-8')
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  tmp.replace(path)


def write_json_atomic(path: PathLike, value: Any, **dump_kwargs) -> None:
  """`json.dumps(value, **dump_kwargs)` written atomically."""
  write_text_atomic(path, json.dumps(value, **dump_kwargs))


def read_json(path: PathLike) -> Any:
  """The JSON value in a file.

  Raises:
    MissingFileError: no such file.
    UserError: the file cannot be read or is not JSON; names the file.
  """
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except FileNotFoundError:
    raise errors.MissingFileError(f'{path} not found') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.UserError(f'cannot read {path}: {e}') from None
