"""uvicorn's HTTP protocol (httptools, i.e. llhttp) with limits per connection.

llhttp does the framing: it refuses Content-Length beside Transfer-Encoding,
differing Content-Lengths, transfer codings that do not end in chunked,
bare LFs and obsolete line folding (capjax.serving.bodies refuses the rest).
What uvicorn leaves to a proxy, this subclass adds, so that clients that
hold connections open cannot starve the others:

- a deadline for a request's headers, from the connection's start or the
  previous answer (slowloris: a header byte every few seconds); a body's
  deadline is the app's (capjax.serving.bodies);
- the most connections at once, in all and per client address, so that one
  client cannot take every connection;
- the most requests per connection, and header size and count limits;
- closing after an error without resetting the connection: the client's
  unread body is read and dropped for a moment after the answer, so that
  the client sees the answer instead of a reset;
- a client that half-closes mid-body gets a 400, not a wait;
- its own refusals in the API's JSON form.
"""

import asyncio
import collections
import dataclasses
import json
from typing import Any

import httptools
from uvicorn.protocols.http import httptools_impl

from capjax.serving import bodies
from capjax.serving import metrics as metrics_lib

# Seconds unread data is read and dropped before a connection is closed.
_LINGER_S = 1.0


@dataclasses.dataclass(frozen=True)
class Limits:
  """Connection limits.

  Attributes:
    max_connections: the most open connections.
    max_connections_per_client: the most open connections of one address.
    header_timeout_s: the time a request's headers may take, counted from
      the connection's start or the previous answer.
    keep_alive_s: how long an idle connection is kept open.
    max_requests_per_connection: requests before the connection is closed.
    max_header_bytes: the most bytes of request line and headers.
    max_headers: the most header fields.
  """

  max_connections: int = 128
  max_connections_per_client: int = 32
  header_timeout_s: float = 10.0
  keep_alive_s: float = 5.0
  max_requests_per_connection: int = 1000
  max_header_bytes: int = 32 * 1024
  max_headers: int = 100


class _Transport:
  """A transport whose close() is the protocol's (lingering) close."""

  def __init__(self, transport: asyncio.Transport, protocol: '_Protocol'):
    self._transport = transport
    self._protocol = protocol

  def __getattr__(self, name: str) -> Any:
    return getattr(self._transport, name)

  def close(self) -> None:
    self._protocol.close_lingering()

  def is_closing(self) -> bool:
    return self._protocol.lingering or self._transport.is_closing()


def _response(status: int, message: str) -> bytes:
  body = json.dumps({'error': message}).encode() + b'\n'
  return b''.join(
    [
      httptools_impl.STATUS_LINE[status],
      b'content-type: application/json\r\n',
      b'content-length: %d\r\n' % len(body),
      b'x-content-type-options: nosniff\r\n',
      b'cache-control: no-store\r\n',
      b'retry-after: 1\r\n' if status == 503 else b'',
      b'connection: close\r\n\r\n',
      body,
    ]
  )


class _Protocol(httptools_impl.HttpToolsProtocol):
  """HttpToolsProtocol with `Limits`; made by `protocol_class`."""

  limits: Limits = Limits()
  metrics: metrics_lib.Metrics | None = None
  # Open connections per client address, shared by the class's instances.
  clients: collections.Counter

  def connection_made(self, transport: asyncio.Transport) -> None:
    self._raw_transport = transport
    self.lingering = False
    self._awaiting_headers = True
    self._header_bytes = self._header_count = self._header_size = 0
    self._requests = 0
    self._header_timer = None
    super().connection_made(_Transport(transport, self))
    self._address = self.client[0] if self.client else ''
    self.clients[self._address] += 1
    if len(self.connections) > self.limits.max_connections:
      self._refuse(503, 'too many connections; retry later', 'connections')
    elif self.clients[self._address] > self.limits.max_connections_per_client:
      self._refuse(
        503,
        'too many connections from your address; retry later',
        'client_connections',
      )
    else:
      self._arm_header_timer()

  def connection_lost(self, exc: Exception | None) -> None:
    self.clients[self._address] -= 1
    if not self.clients[self._address]:
      del self.clients[self._address]
    self._cancel_header_timer()
    super().connection_lost(exc)

  def _count(self, reason: str) -> None:
    if self.metrics:
      self.metrics.refused.labels(reason).inc()

  def _refuse(self, status: int, message: str, reason: str) -> None:
    """Answers with a JSON error and closes, whatever the request state."""
    self._count(reason)
    cycle = self.cycle
    if cycle is not None and not cycle.response_complete:
      # The app's request ends here: it sees a disconnect, and its answer,
      # if any, is dropped.
      cycle.disconnected = True
      cycle.message_event.set()
      if cycle.response_started:
        self._raw_transport.close()  # an answer is half sent: cut it
        return
    if not self._raw_transport.is_closing() and not self.lingering:
      self._raw_transport.write(_response(status, message))
    # The client may be sending its request still: linger.
    self.close_lingering(force=True)

  # --- Closing ---------------------------------------------------------------

  def close_lingering(self, force: bool = False) -> None:
    """Closes; if the client may still be sending, drains it for a moment.

    Closing a socket with unread data resets the connection, and the client
    loses the answer it is about to read (a 413 before its whole body was
    sent).
    """
    transport = self._raw_transport
    if self.lingering or transport.is_closing():
      return
    self._cancel_header_timer()
    cycle = self.cycle
    unread = (
      force
      or (self._awaiting_headers and self._header_bytes)
      or (cycle is not None and cycle.more_body)
    )
    if not unread or not transport.can_write_eof():
      transport.close()
      return
    self.lingering = True
    if cycle is not None and not cycle.response_complete:
      cycle.disconnected = True
      cycle.message_event.set()
    transport.write_eof()
    transport.resume_reading()
    self.loop.call_later(_LINGER_S, transport.close)

  def data_received(self, data: bytes) -> None:
    if self.lingering:
      return  # dropped
    self._unset_keepalive_if_required()
    if self._awaiting_headers:
      self._header_bytes += len(data)
    try:
      self.parser.feed_data(data)
    except httptools.HttpParserError as e:
      self._refuse(400, f'malformed HTTP request: {e}', 'malformed')
      return
    except httptools.HttpParserUpgrade:
      pass  # no upgrades: the request was answered as plain HTTP
    if self._awaiting_headers and (
      self._header_bytes > self.limits.max_header_bytes
    ):
      self._refuse(
        431,
        f'request headers over {self.limits.max_header_bytes:,} bytes',
        'headers',
      )
      return

  def eof_received(self) -> bool | None:
    """The client closed its side: answer what it sent, then close."""
    cycle = self.cycle
    if cycle is None or cycle.response_complete:
      return None  # between requests: close
    if cycle.more_body:
      # Cut short mid-body: the app sees the body end, and answers 400.
      self.scope.setdefault('extensions', {})[bodies.TRUNCATED] = True
      cycle.more_body = False
      cycle.message_event.set()
    cycle.keep_alive = False
    return True  # keeps the connection open for the answer

  # --- Headers ---------------------------------------------------------------

  def _arm_header_timer(self) -> None:
    self._cancel_header_timer()
    self._awaiting_headers = True
    self._header_bytes = self._header_count = self._header_size = 0
    self._header_timer = self.loop.call_later(
      self.limits.header_timeout_s, self._on_header_timeout
    )

  def _cancel_header_timer(self) -> None:
    if self._header_timer is not None:
      self._header_timer.cancel()
      self._header_timer = None

  def _on_header_timeout(self) -> None:
    self._header_timer = None
    if not self._header_bytes:
      self._count('idle')
      self.close_lingering()  # an idle connection: no one to answer
      return
    self._refuse(
      408,
      f'request headers not complete within {self.limits.header_timeout_s:g} s',
      'header_timeout',
    )

  def on_url(self, url: bytes) -> None:
    self._header_size += len(url)
    super().on_url(url)

  def on_header(self, name: bytes, value: bytes) -> None:
    self._header_count += 1
    self._header_size += len(name) + len(value) + 4
    super().on_header(name, value)

  def on_headers_complete(self) -> None:
    self._awaiting_headers = False
    self._cancel_header_timer()
    # Headers that arrived in one piece are measured here; data_received
    # bounds those still arriving.
    if (
      self._header_count > self.limits.max_headers
      or self._header_size > self.limits.max_header_bytes
    ):
      self._refuse(
        431,
        f'request headers over {self.limits.max_headers} '
        f'fields or {self.limits.max_header_bytes:,} bytes',
        'headers',
      )
      return
    self._header_bytes = 0
    self._requests += 1
    super().on_headers_complete()
    if self._requests >= self.limits.max_requests_per_connection:
      self.cycle.keep_alive = False

  def on_body(self, body: bytes) -> None:
    if not self.lingering:  # else the request was refused: drop its body
      super().on_body(body)

  def on_message_complete(self) -> None:
    if not self.lingering:
      super().on_message_complete()

  def on_response_complete(self) -> None:
    super().on_response_complete()
    # Unless a pipelined request (already read) has started, the next
    # request's headers are awaited.
    if not self.transport.is_closing() and self.cycle.response_complete:
      self._arm_header_timer()


def protocol_class(
  limits: Limits, metrics: metrics_lib.Metrics | None = None
) -> type:
  """A uvicorn `http` protocol class enforcing limits (one per server)."""
  return type(
    'CapjaxHttpProtocol',
    (_Protocol,),
    {'limits': limits, 'metrics': metrics, 'clients': collections.Counter()},
  )
