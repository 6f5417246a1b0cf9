"""Why a checkpoint cannot be read, in words that name the file.

Orbax and TensorStore raise many types on damaged files, with messages
written for their developers: Orbax's holds the repr of a whole TensorStore,
many lines long. `reason` makes one line of what is wrong, for capjax's
messages about a damaged step.
"""

import json
import os
import pathlib
import shutil

# Where damaged checkpoints are moved, in the workdir; never deleted.
DAMAGED_DIR = 'damaged_checkpoints'

# How much of a restore error a message quotes.
_REASON_CHARS = 300

# TensorStore's status codes of a damaged file, in words.
_STATUS_WORDS = {
  'OUT_OF_RANGE': 'a file is cut short',
  'DATA_LOSS': 'a file is corrupt',
  'FAILED_PRECONDITION': 'a file cannot be parsed',
  'NOT_FOUND': 'a file is missing',
}
# Python's errors of a damaged metadata file (JSON), in words.
_PARSE_WORDS = {
  json.JSONDecodeError: 'is not valid JSON',
  UnicodeDecodeError: 'is not text',
}


def _innermost(error: BaseException) -> BaseException:
  while True:
    cause = error.__cause__ or (
      None if error.__suppress_context__ else error.__context__
    )
    if cause is None:
      return error
    error = cause


def _file_read_by(error: BaseException) -> str | None:
  """The file the innermost frame that names one was reading, if any.

  Python's JSON and text decoding errors do not name what they decoded.
  """
  frames = []
  traceback = error.__traceback__
  while traceback is not None:
    frames.append(traceback.tb_frame)
    traceback = traceback.tb_next
  for frame in reversed(frames):
    for value in frame.f_locals.values():
      if isinstance(value, os.PathLike) and os.path.isfile(value):
        return os.fspath(value)
  return None


def reason(error: BaseException) -> str:
  """Why a checkpoint cannot be read, in one line, naming the file.

  Orbax wraps the error of the read that failed in one whose message holds
  the repr of a whole TensorStore, many lines long: the innermost error is
  the one that says what is wrong. TensorStore's own messages nest their
  context, outermost first ('Error opening ...: Error reading ...: Error
  decoding local file "F": reason [tensorstore_spec=...]'): the part from
  the innermost file on is kept, without the spec.
  """
  error = _innermost(error)
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  code, _, rest = text.partition(': ')
  if code in _STATUS_WORDS:
    parts = rest.split(' [tensorstore_spec')[0].split(': ')
    named = [i for i, part in enumerate(parts) if 'file "' in part]
    kept = parts[named[-1] :] if named else parts
    text = f'{_STATUS_WORDS[code]}: {": ".join(kept)}'
  elif type(error) in _PARSE_WORDS:
    path = _file_read_by(error)
    what = f'file "{path}"' if path else 'a metadata file'
    text = f'{what} {_PARSE_WORDS[type(error)]}: {text}'
  else:
    text = f'{type(error).__name__}: {text}'
  return text[:_REASON_CHARS]


def move_aside(
  workdir: str | os.PathLike[str], damaged: pathlib.Path
) -> pathlib.Path:
  """Moves a damaged checkpoint out of the way, keeping its files.

  Args:
    workdir: the workdir.
    damaged: a step's directory of `checkpoints.directory(workdir)`, or the
      whole `checkpoints.best_directory(workdir)` (a damaged score may hide
      its step).

  Returns:
    Where it went: damaged/<its name> in the workdir.
  """
  target = pathlib.Path(workdir).absolute() / DAMAGED_DIR / damaged.name
  target.parent.mkdir(parents=True, exist_ok=True)
  if target.exists():
    shutil.rmtree(target)
  shutil.move(damaged, target)
  return target
