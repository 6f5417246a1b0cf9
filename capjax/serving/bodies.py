"""Reading an untrusted request body: bounded in size and time, then parsed.

The HTTP framing (Content-Length, chunked) is uvicorn's; this module reads
what it delivers through Starlette's `request.stream()`, refusing a body as
soon as it grows over its limit or outlives its time, and parses the three
kinds of body a caption request may have: an image, a multipart form (by
python-multipart) and a small JSON object.
"""

import asyncio
from collections.abc import Iterator
import contextlib
import json
from typing import Any

from python_multipart import multipart
from starlette import requests as starlette_requests

from capjax.serving import requests

# Set in the ASGI scope's extensions by capjax.serving.protocol when the
# client half-closed its connection before the body was complete.
TRUNCATED = 'capjax.body_truncated'
# A JSON body only names a URL (and parameters).
MAX_JSON_BYTES = 16 * 1024


class Deadlines:
  """The time limits of bodies being read, all brought forward at shutdown."""

  def __init__(self) -> None:
    self._active: set[asyncio.Timeout] = set()
    self._shutdown_at: float | None = None

  @contextlib.asynccontextmanager
  async def limit(self, seconds: float):
    """A block that raises TimeoutError after `seconds`, or at shutdown."""
    loop = asyncio.get_running_loop()
    when = loop.time() + seconds
    if self._shutdown_at is not None:
      when = min(when, self._shutdown_at)
    async with asyncio.timeout_at(when) as timeout:
      self._active.add(timeout)
      try:
        yield
      finally:
        self._active.discard(timeout)

  def shutdown(self, seconds: float) -> None:
    """Bodies still being read in `seconds` are refused then."""
    shutdown_at = asyncio.get_running_loop().time() + seconds
    self._shutdown_at = shutdown_at
    for timeout in self._active:
      when = timeout.when()
      if when is None or when > shutdown_at:
        timeout.reschedule(shutdown_at)


def content_type(
  request: starlette_requests.Request,
) -> tuple[str, dict[str, str]]:
  """The request's lowercase media type and its parameters."""
  media_type, params = multipart.parse_options_header(
    request.headers.get('content-type', '')
  )
  return (
    media_type.decode('latin-1'),
    {
      k.decode('latin-1').lower(): v.decode('latin-1')
      for k, v in params.items()
    },
  )


def check_framing(request: starlette_requests.Request, limit: int) -> None:
  """Refuses a body by its headers alone, before any of it is read.

  Raises:
    RequestError: 501 a transfer coding other than chunked, 411 no length,
      413 a declared length over limit.
  """
  coding = request.headers.get('transfer-encoding')
  if coding is not None:
    # uvicorn (llhttp) refuses malformed framing and Content-Length beside
    # Transfer-Encoding; what reaches here ends in chunked, but other
    # codings before it (gzip, chunked) would be handed over undecoded.
    if coding.strip().lower() != 'chunked':
      raise requests.RequestError(
        501,
        f'Transfer-Encoding {coding[:100]!r} is not supported: send '
        'the body as it is, with Content-Length or chunked',
      )
    return
  length = request.headers.get('content-length')
  if length is None:
    raise requests.RequestError(
      411, 'Content-Length required (or Transfer-Encoding: chunked)'
    )
  if int(length) > limit:
    raise requests.RequestError(
      413, f'body of {int(length):,} bytes is over the limit of {limit:,} bytes'
    )


async def read_body(
  request: starlette_requests.Request,
  *,
  limit: int,
  timeout_s: float,
  deadlines: Deadlines,
) -> bytes:
  """The whole body, read as it streams in.

  Raises:
    RequestError: 413 over limit (as soon as it is), 408 not complete within
      timeout_s, 400 cut short (the client closed its side early).
    ClientDisconnect: the client left.
  """
  check_framing(request, limit)
  body = bytearray()
  try:
    async with deadlines.limit(timeout_s):
      async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
          raise requests.RequestError(
            413, f'body over the limit of {limit:,} bytes'
          )
  except TimeoutError:
    raise requests.RequestError(
      408, f'the body took over {timeout_s:g} s to arrive'
    ) from None
  declared = request.headers.get('content-length')
  if declared is not None and len(body) < int(declared):
    raise requests.RequestError(
      400,
      f'body ended after {len(body)} of {int(declared)} bytes (Content-Length)',
    )
  if request.scope.get('extensions', {}).get(TRUNCATED):
    raise requests.RequestError(400, 'body ended before its last chunk')
  return bytes(body)


def parse_multipart(
  params: dict[str, str], body: bytes, max_fields: int
) -> dict[str, list[bytes]]:
  """A multipart/form-data body -> {field name: [content, ...]}.

  Raises:
    RequestError: 400, malformed or with more than max_fields parts.
  """
  boundary = params.get('boundary')
  if not boundary:
    raise requests.RequestError(400, 'multipart/form-data without a boundary')
  fields: dict[str, list[bytes]] = {}
  # 'headers': [[name, value], ...]; 'data': [bytes, ...].
  part: dict[str, list[Any]] = {'headers': [], 'data': []}
  ended = []

  def on_header_field(data, start, end):
    part['headers'].append([data[start:end], b''])

  def on_header_value(data, start, end):
    part['headers'][-1][1] += data[start:end]

  def on_part_data(data, start, end):
    part['data'].append(data[start:end])

  def on_part_end():
    disposition = b''.join(
      v for k, v in part['headers'] if k.lower() == b'content-disposition'
    )
    _, options = multipart.parse_options_header(disposition)
    name = options.get(b'name')
    if name is None:
      raise requests.RequestError(400, 'a form part without a name')
    fields.setdefault(name.decode('utf-8', 'replace'), []).append(
      b''.join(part['data'])
    )
    if sum(map(len, fields.values())) > max_fields:
      raise requests.RequestError(400, 'too many form fields')
    part['headers'], part['data'] = [], []

  try:
    parser = multipart.MultipartParser(
      boundary,
      {
        'on_header_field': on_header_field,
        'on_header_value': on_header_value,
        'on_part_data': on_part_data,
        'on_part_end': on_part_end,
        'on_end': lambda: ended.append(True),
      },
    )
    parser.write(body)
    parser.finalize()
  # A bad boundary or body; python-multipart's errors are ValueErrors.
  except multipart.FormParserError:
    ended.clear()
  if not ended:
    raise requests.RequestError(400, 'malformed multipart/form-data body')
  return fields


def form_params(fields: dict[str, list[bytes]]) -> Iterator[tuple[str, str]]:
  """The form's text fields as (name, value) pairs."""
  for name, values in fields.items():
    for value in values:
      try:
        yield name, value.decode('utf-8')
      except UnicodeDecodeError:
        raise requests.RequestError(
          400, 'form fields must be UTF-8 text'
        ) from None


def parse_json_object(body: bytes) -> dict[str, Any]:
  """A JSON object.

  Raises:
    RequestError: 400, not JSON (nested too deep included) or not an object.
  """
  try:
    value = json.loads(body)
  # A deeply nested body exhausts the parser's recursion, not a ValueError.
  except (ValueError, RecursionError) as e:
    raise requests.RequestError(400, f'invalid JSON: {str(e)[:200]}') from None
  if not isinstance(value, dict):
    raise requests.RequestError(400, 'send a JSON object, {"url": ...}')
  return value
