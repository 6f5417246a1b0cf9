"""The error types of mistakes a user can fix.

Programs print a `UserError` as one line and exit 1 (`capjax.programs.run`);
any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A mistake the user can fix: a bad flag, file, config field or input.

  Its message says what is wrong and, where it helps, what to do.
  """


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user must provide or make first is absent."""
