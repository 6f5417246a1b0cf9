"""Orbax's log lines that tell a capjax user nothing, kept off the console."""

import logging as py_logging

# Orbax's log messages that tell a capjax user nothing: that a read-only
# manager (what every load makes) is read-only; that a step's
# _CHECKPOINT_METADATA (its save time, and the score of the best checkpoint)
# cannot be read, which Orbax logs with the file's content. Without the
# metadata a step still restores; without its score, the best checkpoint is
# reported as damaged, by capjax (`read_best`).
_ORBAX_NOISE = (
  'Given directory is read only=',
  'Failed to json parse Metadata file: ',
  'Failed to read Metadata file: ',
)


class _NoOrbaxNoise(py_logging.Filter):
  """Drops the log records of _ORBAX_NOISE."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (
      isinstance(record.msg, str) and record.msg.startswith(_ORBAX_NOISE)
    )


def quiet() -> None:
  """Keeps _ORBAX_NOISE off the console, once, before a manager is made."""
  absl_logger = py_logging.getLogger('absl')  # what Orbax logs through
  if not any(isinstance(f, _NoOrbaxNoise) for f in absl_logger.filters):
    absl_logger.addFilter(_NoOrbaxNoise())
