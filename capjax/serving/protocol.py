"""uvicorn's HTTP protocol (httptools, i.e. llhttp) with limits per connection.

llhttp does the framing: it refuses Content-Length beside Transfer-Encoding,
differing Content-Lengths, transfer codings that do not end in chunked,
bare LFs and obsolete line folding (capjax.serving.bodies refuses the rest).
What uvicorn leaves to a proxy, this subclass adds, so that every part of a
request the client controls is bounded in bytes, count and time, and clients
that hold connections cannot starve the others:

- a deadline for a request's headers, from the connection's start or the
  previous answer (slowloris: a header byte every few seconds); a body's
  deadline is the app's (capjax.serving.bodies);
- the request line and headers, and the trailers after a chunked body,
  bounded in bytes and fields (uvicorn would append trailers to the
  request's headers, without a limit);
- the bytes on the wire of a body, chunk framing and extensions included,
  and its number of chunks (the app's limit counts only the data);
- at most `max_pipelined` requests read ahead of the one being answered:
  the connection closes after answering them, and the rest is dropped
  unparsed;
- upgrades (`Upgrade: h2c`, websocket) ignored: the request is read and
  answered as HTTP/1.1;
- the most connections at once, in all and per client address; when all
  are taken, a client on an address that holds fewer takes the place of
  the oldest connection of the address that holds the most, so that a few
  addresses reconnecting at once cannot lock out a new one;
- the most requests per connection;
- while the server drains (SIGTERM), new connections get 503 with
  Retry-After, not a reset;
- closing after an error without resetting the connection: the client's
  unread data is read and dropped for a moment after the answer, so that
  the client sees the answer instead of a reset;
- a client that half-closes mid-body gets a 400, not a wait;
- its own refusals in the API's JSON form.

A closed connection's objects are freed by reference counting (no cycle is
left for the garbage collector).
"""

import asyncio
import json
import typing
from typing import Any
import weakref

import httptools
from uvicorn.protocols.http import httptools_impl

from capjax.serving import bodies
from capjax.serving import limits as limits_lib
from capjax.serving import metrics as metrics_lib

# Seconds unread data is read and dropped before a connection is closed.
_LINGER_S = 1.0
# Headers that ask for another protocol; dropped when an upgrade is ignored.
_UPGRADE_HEADERS = (b'connection', b'upgrade', b'http2-settings')


class _Shared:
  """What the connections of one server share."""

  def __init__(self) -> None:
    # Address -> its open connections, oldest first (a dict as an ordered
    # set).
    self.clients: dict[str, dict[_Protocol, None]] = {}
    self.draining = False


class _Stop(Exception):
  """Raised in a parser callback to stop parsing: the request was refused."""


class _Transport:
  """A transport whose close() is the protocol's (lingering) close.

  It holds its protocol weakly: the protocol holds it, and a cycle would
  leave every closed connection to the garbage collector.
  """

  def __init__(self, transport: asyncio.Transport, protocol: '_Protocol'):
    self._transport = transport
    self._protocol = weakref.ref(protocol)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._transport, name)

  def close(self) -> None:
    protocol = self._protocol()
    if protocol is None:
      self._transport.close()
    else:
      protocol.close_lingering()

  def is_closing(self) -> bool:
    protocol = self._protocol()
    return (
      protocol is not None and protocol.lingering
    ) or self._transport.is_closing()


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
  """HttpToolsProtocol with `limits_lib.Limits`; made by `protocol_class`."""

  limits: limits_lib.Limits = limits_lib.Limits()
  metrics: metrics_lib.Metrics | None = None
  shared: _Shared

  def connection_made(self, transport: asyncio.BaseTransport) -> None:
    # A stream server's protocol is given a (read and write) Transport.
    transport = typing.cast(asyncio.Transport, transport)
    self._raw_transport = transport
    self.lingering = False
    self._stopped = False  # parsing stopped: the rest of the input is dropped
    self._replaying = False
    self._in_headers = False
    self._awaiting_headers = True
    self._header_bytes = self._header_count = self._header_size = 0
    self._body_wire_bytes = self._chunks = 0
    self._requests = 0
    self._header_timer: asyncio.TimerHandle | None = None
    # _Transport passes what it does not define to the transport.
    super().connection_made(
      typing.cast(asyncio.Transport, _Transport(transport, self))
    )
    self._address = self.client[0] if self.client else ''
    mine = self.shared.clients.setdefault(self._address, {})
    mine[self] = None
    if self.shared.draining:
      self._refuse(503, 'the server is shutting down', 'draining')
    elif len(mine) > self.limits.max_connections_per_client:
      self._refuse(
        503,
        'too many connections from your address; retry later',
        'client_connections',
      )
    elif (
      # Closing (lingering) connections go by themselves within a second:
      # counted, a client that reconnects as fast as it is refused would
      # fill the total with them.
      sum(not c.lingering for c in self._connections())
      > self.limits.max_connections
    ):
      if not self._evict_heaviest(sum(not c.lingering for c in mine)):
        self._refuse(503, 'too many connections; retry later', 'connections')
        return
      self._arm_header_timer()
    else:
      self._arm_header_timer()

  def _connections(self) -> set['_Protocol']:
    # The server's connections are all of this class: it is the only http
    # protocol of its server, which serves no websockets.
    return typing.cast(set[_Protocol], self.connections)

  def _evict_heaviest(self, held: int) -> bool:
    """Closes the oldest connection of the address holding the most.

    Only if that address holds more than this one (with this connection):
    a newcomer is let in, a client as heavy as the heaviest is not. Closing
    connections (lingering) are not counted: they go by themselves.
    """
    live = [
      [c for c in connections if not c.lingering]
      for connections in self.shared.clients.values()
    ]
    heaviest = max(live, key=len)
    if len(heaviest) <= held:
      return False
    # The oldest not halfway through an answer (cutting one loses it).
    for oldest in heaviest:
      if oldest.cycle is None or not (
        oldest.cycle.response_started and not oldest.cycle.response_complete
      ):
        oldest._refuse(  # noqa: SLF001
          503, 'too many connections from your address; retry later', 'evicted'
        )
        return True
    return False

  def connection_lost(self, exc: Exception | None) -> None:
    mine = self.shared.clients.get(self._address, {})
    mine.pop(self, None)
    if not mine:
      self.shared.clients.pop(self._address, None)
    self._cancel_header_timer()
    super().connection_lost(exc)
    # Read-ahead requests are not answered now.
    for cycle, _ in self.pipeline:
      cycle.disconnected = True
    self.pipeline.clear()

  def _count(self, reason: str) -> None:
    if self.metrics:
      self.metrics.refused.labels(reason).inc()

  def _refuse(self, status: int, message: str, reason: str) -> None:
    """Answers with a JSON error and closes, whatever the request state."""
    self._count(reason)
    self._stopped = True
    # Read-ahead requests are not answered.
    for cycle, _ in self.pipeline:
      cycle.disconnected = True
    self.pipeline.clear()
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

  def _refuse_and_stop(self, status: int, message: str, reason: str) -> None:
    """`_refuse` from a parser callback: the parser stops here."""
    self._refuse(status, message, reason)
    raise _Stop

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
      or self._stopped
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
    if self.lingering or self._stopped:
      return  # dropped
    self._unset_keepalive_if_required()
    if self._awaiting_headers:
      self._header_bytes += len(data)
    elif self.cycle is not None and self.cycle.more_body:
      # Bytes of a body on the wire: data, chunk framing and trailers (and
      # at most one read of whatever follows).
      self._body_wire_bytes += len(data)
    self._feed(data)
    if self.lingering or self._stopped:
      return
    wire_limit = self.limits.max_body_bytes + self.limits.max_framing_bytes
    if self._awaiting_headers and (
      self._header_bytes > self.limits.max_header_bytes
    ):
      self._refuse(
        431,
        f'request headers over {self.limits.max_header_bytes:,} bytes',
        'headers',
      )
    elif self._body_wire_bytes > wire_limit:
      self._refuse(
        413,
        f'body over {wire_limit:,} bytes on the wire (framing included)',
        'body_framing',
      )

  def _feed(self, data: bytes) -> None:
    try:
      self.parser.feed_data(data)
    except httptools.HttpParserUpgrade as e:
      self._ignore_upgrade(data[e.args[0] :])
    except httptools.HttpParserError as e:
      if self._stopped:  # _Stop, or the pipeline is full
        return
      self._refuse(400, f'malformed HTTP request: {e}', 'malformed')

  def _ignore_upgrade(self, rest: bytes) -> None:
    """Reads an upgrade request (`Upgrade: h2c`) as plain HTTP/1.1.

    llhttp stops at the end of the request's headers and leaves what follows
    to the new protocol. A new parser is given the same request without its
    upgrade headers (its callbacks skipped: the request is already under
    way), then the rest: the body, as HTTP/1.1 frames it.
    """
    if self.scope['method'] == 'CONNECT':
      self._refuse(405, 'CONNECT is not served', 'malformed')
      return
    head = [f'{self.scope["method"]} '.encode(), self.url, b' HTTP/1.1\r\n']
    for name, value in self.headers:
      if name not in _UPGRADE_HEADERS:
        head += [name, b': ', value, b'\r\n']
    self.parser = httptools.HttpRequestParser(self)
    self._replaying = True
    try:
      self.parser.feed_data(b''.join(head + [b'\r\n']))
    finally:
      self._replaying = False
    if rest:
      self._feed(rest)

  # uvicorn's HttpToolsProtocol declares None, narrower than asyncio's
  # Protocol, whose True keeps the connection open.
  def eof_received(self) -> bool | None:  # type: ignore[override]
    """The client closed its side: answer what it sent, then close."""
    cycle = self.cycle
    if cycle is None or cycle.response_complete:
      return None  # between requests: close
    if cycle.more_body:
      # Cut short mid-body: the app sees the body end, and answers 400.
      # asgiref types extensions' values as dicts; this one is a flag.
      extensions = typing.cast(
        dict[str, Any], self.scope.setdefault('extensions', {})
      )
      extensions[bodies.TRUNCATED] = True
      cycle.more_body = False
      cycle.message_event.set()
    cycle.keep_alive = False
    return True  # keeps the connection open for the answer

  # --- Headers ---------------------------------------------------------------

  def _arm_header_timer(self) -> None:
    self._cancel_header_timer()
    self._awaiting_headers = True
    self._header_bytes = 0
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

  def _check_header_size(self, what: str) -> None:
    if (
      self._header_count > self.limits.max_headers
      or self._header_size > self.limits.max_header_bytes
    ):
      self._refuse_and_stop(
        431,
        f'request {what} over {self.limits.max_headers} '
        f'fields or {self.limits.max_header_bytes:,} bytes',
        what,
      )

  def on_message_begin(self) -> None:
    if self._replaying:
      return
    pending = self.cycle is not None and not self.cycle.response_complete
    if pending and len(self.pipeline) >= self.limits.max_pipelined:
      # Enough read ahead: answer those, then close; the rest is dropped.
      self._stopped = True
      (self.pipeline[0][0] if self.pipeline else self.cycle).keep_alive = False
      self._count('pipelined')
      raise _Stop
    self._header_count = self._header_size = 0
    self._body_wire_bytes = self._chunks = 0
    self._in_headers = True
    super().on_message_begin()

  def on_url(self, url: bytes) -> None:
    if self._replaying:
      return
    self._header_size += len(url)
    self._check_header_size('headers')
    super().on_url(url)

  def on_header(self, name: bytes, value: bytes) -> None:
    if self._replaying:
      return
    self._header_count += 1
    self._header_size += len(name) + len(value) + 4
    if not self._in_headers:
      # A trailer (after a chunked body): counted, then dropped; the app
      # reads none.
      self._check_header_size('trailers')
      return
    self._check_header_size('headers')
    super().on_header(name, value)

  def on_headers_complete(self) -> None:
    if self._replaying:
      return
    self._awaiting_headers = self._in_headers = False
    self._cancel_header_timer()
    self._header_bytes = 0
    self._header_count = self._header_size = 0  # now counting trailers
    self._requests += 1
    super().on_headers_complete()
    if self._requests >= self.limits.max_requests_per_connection:
      self.cycle.keep_alive = False

  def on_chunk_header(self) -> None:
    self._chunks += 1
    if self._chunks > self.limits.max_chunks:
      self._refuse_and_stop(
        413,
        f'chunked body of over {self.limits.max_chunks:,} chunks',
        'body_framing',
      )

  def on_body(self, body: bytes) -> None:
    if not self.lingering:  # else the request was refused: drop its body
      super().on_body(body)

  def on_message_complete(self) -> None:
    if self.lingering or self.parser.should_upgrade():
      return  # refused; or an upgrade, whose body comes after (see above)
    super().on_message_complete()

  def on_response_complete(self) -> None:
    super().on_response_complete()
    # Unless a pipelined request (already read) has started, the next
    # request's headers are awaited.
    cycle = self.cycle
    if not self.transport.is_closing() and cycle and cycle.response_complete:
      self._arm_header_timer()


def protocol_class(
  limits: limits_lib.Limits, metrics: metrics_lib.Metrics | None = None
) -> type[_Protocol]:
  """A uvicorn `http` protocol class enforcing limits (one per server).

  Its `shared.draining`, once set, answers new connections 503.
  """
  return typing.cast(
    type[_Protocol],
    type(
      'CapjaxHttpProtocol',
      (_Protocol,),
      {'limits': limits, 'metrics': metrics, 'shared': _Shared()},
    ),
  )
