"""Reading an untrusted captioning request: its parameters and its image.

A refused request is a `RequestError` carrying the HTTP status and a message
for the client.
"""

from collections.abc import Iterable, Mapping
import dataclasses
import email.message
import io
import re
from typing import Any

import numpy as np

from capjax.data import images

# Raw bodies of these types (and any image/*) are images.
RAW_IMAGE_TYPES = ('application/octet-stream',)
PARAMETERS = ('beam_size', 'max_len', 'attention')
# Seconds a client is told to wait when the server is busy.
RETRY_AFTER_S = 1

_MAX_LINE = 1024  # bytes of a chunk-size or trailer line
_MAX_TRAILERS = 32


class RequestError(Exception):
  """A refused request: the HTTP status and a message for the client."""

  def __init__(self, status: int, message: str,
               headers: Mapping[str, str] | None = None):
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


def read_image(data: bytes, max_pixels: int, draft_size: int) -> np.ndarray:
  """Untrusted image bytes -> RGB uint8 (H, W, 3), by `images.load_image`.

  Raises:
    RequestError: 400 empty or unreadable, 413 too many pixels, 415 not an
      image of images.FORMATS.
  """
  if not data:
    raise RequestError(400, 'empty body: send an image (JPEG, PNG, ...)')
  try:
    return images.load_image(data, max_pixels=max_pixels,
                             draft_size=draft_size)
  except images.ImageError as e:
    raise RequestError(e.http_status, str(e)) from None


def _int_param(params: Mapping[str, Any], name: str, default: int,
               high: int) -> int:
  value = params.get(name, default)
  if (isinstance(value, (int, str)) and not isinstance(value, bool)
      and re.fullmatch(r'[0-9]{1,9}', str(value).strip())
      and 1 <= int(value) <= high):
    return int(value)
  raise RequestError(400, f'{name} must be an integer from 1 to {high}, got '
                     f'{value!r}')


def _bool_param(params: Mapping[str, Any], name: str) -> bool:
  value = params.get(name, False)
  text = str(value).strip().lower()
  if isinstance(value, bool) or text in ('true', 'false', '1', '0', ''):
    return text in ('true', '1', '')
  raise RequestError(400, f'{name} must be true or false, got {value!r}')


def parse_params(params: Mapping[str, Any], *, max_beam_size: int,
                 max_len: int) -> tuple[DecodeKind, bool]:
  """A request's decoding kind and whether it wants the attention.

  Args:
    params: query, form or JSON fields (strings, or JSON ints and bools).
    max_beam_size: the largest beam_size accepted.
    max_len: the default and largest max_len.

  Raises:
    RequestError: 400, an unknown parameter or a value out of range.
  """
  unknown = sorted(set(params) - set(PARAMETERS))
  if unknown:
    raise RequestError(400, f'unknown parameter(s) {", ".join(unknown)}; '
                       f'known: {", ".join(PARAMETERS)}')
  kind = DecodeKind(
      beam_size=_int_param(params, 'beam_size', 1, max_beam_size),
      max_len=_int_param(params, 'max_len', max_len, max_len))
  return kind, _bool_param(params, 'attention')


def merge_params(*sources: Iterable[tuple[str, Any]]) -> dict[str, Any]:
  """One dict of the (name, value) pairs of all sources; a name only once."""
  params = {}
  for name, value in (pair for source in sources for pair in source):
    if name in params:
      raise RequestError(400, f'parameter {name!r} is given twice')
    params[name] = value
  return params


def parse_header(value: str) -> tuple[str, dict[str, Any]]:
  """A Content-Type header -> (its lowercase type, its parameters)."""
  message = email.message.Message()
  message['content-type'] = value
  params = message.get_params(header='content-type') or []
  return (value.split(';', 1)[0].strip().lower(),
          {k.lower(): v for k, v in params[1:]})


def parse_multipart(boundary: Any, body: bytes) -> dict[str, bytes]:
  """A multipart/form-data body -> {field name: content}.

  Raises:
    RequestError: 400, malformed.
  """
  if not boundary or not isinstance(boundary, str):
    raise RequestError(400, 'multipart/form-data without a boundary')
  malformed = RequestError(400, 'malformed multipart/form-data body')
  parts = body.split(b'--' + boundary.encode('latin-1'))
  fields = {}
  # parts[0] is the preamble; the closing delimiter's part starts with '--'.
  for part in parts[1:]:
    if part.startswith(b'--'):
      return fields
    head, separator, content = part.partition(b'\r\n\r\n')
    if not (separator and head.startswith(b'\r\n')
            and content.endswith(b'\r\n')):
      raise malformed
    disposition = email.message.Message()
    for line in head[2:].split(b'\r\n'):
      name, _, value = line.decode('latin-1').partition(':')
      disposition[name.strip()] = value.strip()
    field = disposition.get_param('name', header='content-disposition')
    if not isinstance(field, str):
      raise malformed
    fields[field] = content[:-2]
  raise malformed


def content_length(headers: Mapping[str, str], limit: int) -> int:
  """The declared body size, checked before anything is read.

  Raises:
    RequestError: 411 missing, 400 invalid, 413 over limit.
  """
  value = headers.get('Content-Length')
  if value is None:
    raise RequestError(411, 'Content-Length required (or Transfer-Encoding: '
                       'chunked)')
  if not re.fullmatch(r'[0-9]{1,18}', value.strip()):
    raise RequestError(400, f'invalid Content-Length {value!r}')
  if int(value) > limit:
    raise RequestError(413, f'body of {int(value):,} bytes is over the limit '
                       f'of {limit:,} bytes')
  return int(value)


def read_chunked(rfile: io.BufferedIOBase, limit: int) -> bytes:
  """A chunked body, refused as soon as it grows over limit bytes."""
  malformed = RequestError(400, 'malformed chunked body')
  body = bytearray()
  while True:
    line = rfile.readline(_MAX_LINE)
    size_field = line.split(b';', 1)[0].strip()
    if not re.fullmatch(rb'[0-9a-fA-F]{1,16}', size_field):
      raise malformed
    size = int(size_field, 16)
    if not size:
      break
    if len(body) + size > limit:
      raise RequestError(413, f'body over the limit of {limit:,} bytes')
    chunk = rfile.read(size)
    if len(chunk) < size or rfile.readline(_MAX_LINE) != b'\r\n':
      raise malformed
    body += chunk
  for _ in range(_MAX_TRAILERS):
    if rfile.readline(_MAX_LINE) in (b'\r\n', b'\n', b''):
      return bytes(body)
  raise malformed
