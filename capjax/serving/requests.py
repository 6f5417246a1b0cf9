"""What a captioning request may ask for, and how a refusal is answered.

A refused request is a `RequestError` carrying the HTTP status and a message
for the client.
"""

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import re
from typing import Any

PARAMETERS = ('beam_size', 'max_len', 'attention')
# Seconds a client is told to wait when the server is busy.
RETRY_AFTER_S = 1


class RequestError(Exception):
  """A refused request: the HTTP status and a message for the client."""

  def __init__(
    self, status: int, message: str, headers: Mapping[str, str] | None = None
  ):
    super().__init__(message)
    self.status = status
    self.headers = dict(headers or {})


def busy(message: str) -> RequestError:
  return RequestError(503, message, {'Retry-After': str(RETRY_AFTER_S)})


@dataclasses.dataclass(frozen=True)
class DecodeKind:
  """What a request asks of the decoder; each kind is batched on its own."""

  beam_size: int
  max_len: int


def max_len_buckets(max_len: int) -> tuple[int, ...]:
  """The max_len values beam search is compiled for: 16, 32, ... and max_len.

  Beam search with a shorter max_len is not a prefix of a longer one, so a
  beam request's max_len is rounded up to one of these; greedy decoding
  takes any max_len (capjax.serving.continuous).
  """
  buckets, bucket = [], 16
  while bucket < max_len:
    buckets.append(bucket)
    bucket *= 2
  return tuple(buckets) + (max_len,)


def _int_param(
  params: Mapping[str, Any], name: str, default: int, high: int
) -> int:
  value = params.get(name, default)
  if (
    isinstance(value, (int, str))
    and not isinstance(value, bool)
    and re.fullmatch(r'[0-9]{1,9}', str(value).strip())
    and 1 <= int(value) <= high
  ):
    return int(value)
  raise RequestError(
    400, f'{name} must be an integer from 1 to {high}, got {str(value)[:100]!r}'
  )


def _bool_param(params: Mapping[str, Any], name: str) -> bool:
  value = params.get(name, False)
  text = str(value).strip().lower()
  if isinstance(value, bool) or text in ('true', 'false', '1', '0', ''):
    return text in ('true', '1', '')
  raise RequestError(
    400, f'{name} must be true or false, got {str(value)[:100]!r}'
  )


def parse_params(
  params: Mapping[str, Any], *, max_beam_size: int, max_len: int
) -> tuple[DecodeKind, bool]:
  """A request's decoding kind and whether it wants the attention.

  A beam search's max_len is rounded up to a `max_len_buckets` value (the
  answer says which); greedy decoding keeps it.

  Args:
    params: query, form or JSON fields (strings, or JSON ints and bools).
    max_beam_size: the largest beam_size accepted.
    max_len: the default and largest max_len.

  Raises:
    RequestError: 400, an unknown parameter or a value out of range.
  """
  unknown = sorted(set(params) - set(PARAMETERS))
  if unknown:
    raise RequestError(
      400,
      f'unknown parameter(s) {", ".join(unknown)[:200]}'
      f'; known: {", ".join(PARAMETERS)}',
    )
  beam_size = _int_param(params, 'beam_size', 1, max_beam_size)
  length = _int_param(params, 'max_len', max_len, max_len)
  if beam_size > 1:
    length = min(b for b in max_len_buckets(max_len) if b >= length)
  return (
    DecodeKind(beam_size=beam_size, max_len=length),
    _bool_param(params, 'attention'),
  )


def merge_params(*sources: Iterable[tuple[str, Any]]) -> dict[str, Any]:
  """One dict of the (name, value) pairs of all sources; a name only once."""
  params = {}
  for name, value in (pair for source in sources for pair in source):
    if name in params:
      raise RequestError(400, f'parameter {name[:100]!r} is given twice')
    params[name] = value
  return params


def check_fields(names: Sequence[str], limit: int) -> None:
  """Refuses more than `limit` fields, before anything is done with them."""
  if len(names) > limit:
    raise RequestError(
      400, f'too many parameters ({len(names)}); known: {", ".join(PARAMETERS)}'
    )
