"""The HTTP protocol's limits (capjax.serving.protocol), against a tiny app.

Each test sends what a hostile client would, over a real socket on
127.0.0.1, to uvicorn running capjax's protocol in this process in front
of an app that reads the body and says what it got. No model is loaded, so
each case takes milliseconds to a second.
"""

import asyncio
import contextlib
import gc
import json
import re
import socket
import threading
import time

import pytest
import uvicorn

from capjax.serving import limits as limits_lib
from capjax.serving import protocol

_LIMITS = limits_lib.Limits(
  max_connections=16,
  max_connections_per_client=6,
  header_timeout_s=1.0,
  keep_alive_s=1.0,
  max_header_bytes=4096,
  max_headers=20,
  max_body_bytes=100_000,
  max_framing_bytes=10_000,
  max_chunks=100,
  max_pipelined=4,
)


async def _echo(scope, receive, send):
  """Answers {"body": bytes read, "headers": fields, "host": [...]}."""
  size, more = 0, True
  while more:
    message = await receive()
    if message['type'] == 'http.disconnect':
      return
    size += len(message.get('body', b''))
    more = message.get('more_body', False)
  if scope['path'] == '/slow':
    await asyncio.sleep(0.5)
  body = json.dumps(
    {'body': size, 'headers': len(scope['headers']), 'path': scope['path']}
  ).encode()
  await send(
    {
      'type': 'http.response.start',
      'status': 200,
      'headers': [(b'content-length', str(len(body)).encode())],
    }
  )
  await send({'type': 'http.response.body', 'body': body})


@contextlib.contextmanager
def _serving(limits=_LIMITS):
  """(port, protocol class) of a server in a thread; stopped after."""
  http = protocol.protocol_class(limits)
  config = uvicorn.Config(
    _echo,
    http=http,
    ws='none',
    lifespan='off',
    log_config=None,
    access_log=False,
    timeout_keep_alive=limits.keep_alive_s,
  )
  server = uvicorn.Server(config)
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  thread = threading.Thread(
    target=server.run, kwargs={'sockets': [sock]}, daemon=True
  )
  thread.start()
  while not server.started:
    time.sleep(0.01)
  try:
    yield sock.getsockname()[1], http
  finally:
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope='module')
def served():
  with _serving() as port_and_class:
    yield port_and_class


def _connect(port, source='127.0.0.1'):
  return socket.create_connection(
    ('127.0.0.1', port), timeout=5, source_address=(source, 0)
  )


def _read_all(sock, timeout=5.0) -> bytes:
  sock.settimeout(timeout)
  data = b''
  try:
    while chunk := sock.recv(65536):
      data += chunk
  except (ConnectionError, TimeoutError):
    pass
  return data


def _exchange(port, *parts: bytes, source='127.0.0.1') -> bytes:
  """The answers to what is sent, in parts, until the server closes."""
  sock = _connect(port, source)
  try:
    for part in parts:
      sock.sendall(part)
  except OSError:
    pass  # refused mid-send; its answer is still there
  answer = _read_all(sock)
  sock.close()
  return answer


def _statuses(answer: bytes) -> list[bytes]:
  return re.findall(rb'HTTP/1\.1 (\d{3}) ', answer)


_CHUNKED = (
  b'POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\n'
  b'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n'
)
_GET = b'GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'


def test_honest_chunked_body_with_trailers(served):
  port, _ = served
  answer = _exchange(port, _CHUNKED + b'3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n')
  assert _statuses(answer) == [b'200']
  # The trailer is read and dropped: the app sees the 3 headers only.
  assert json.loads(answer.split(b'\r\n\r\n')[1]) == {
    'body': 3,
    'headers': 3,
    'path': '/x',
  }


def test_trailer_flood_is_a_431(served):
  port, _ = served
  flood = b''.join(b'T%d: x\r\n' % i for i in range(100_000))
  start = time.monotonic()
  answer = _exchange(port, _CHUNKED + b'3\r\nabc\r\n0\r\n', flood, b'\r\n')
  assert _statuses(answer) == [b'431'], answer[:200]
  assert b'trailers over 20 fields' in answer
  assert time.monotonic() - start < 2.5


def test_chunk_framing_is_bounded(served):
  port, _ = served
  # Extensions on every chunk: bytes on the wire, not of the body.
  extended = b'1;' + b'e' * 5000 + b'\r\nx\r\n'
  answer = _exchange(port, _CHUNKED, extended * 50, b'0\r\n\r\n')
  assert _statuses(answer) == [b'413'], answer[:200]
  assert b'on the wire' in answer
  # Many tiny chunks: their count.
  answer = _exchange(port, _CHUNKED, b'1\r\nx\r\n' * 200, b'0\r\n\r\n')
  assert _statuses(answer) == [b'413'] and b'100 chunks' in answer
  # Under both limits: answered.
  answer = _exchange(port, _CHUNKED, b'1;e=1\r\nx\r\n' * 90, b'0\r\n\r\n')
  assert _statuses(answer) == [b'200']


def test_pipelined_requests_are_answered_up_to_the_limit(served):
  port, _ = served
  # 100 in one write: the first and 4 read ahead are answered, in order,
  # then the connection closes; the client sends the rest again.
  answer = _exchange(port, _GET * 100)
  assert _statuses(answer) == [b'200'] * 5, answer[-300:]
  assert b'connection: close' in answer.split(b'HTTP/1.1')[-1]
  # Pipelined POSTs with bodies, within the limit: all answered.
  post = b'POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc'
  answer = _exchange(
    port, post * 4 + _GET.replace(b'\r\n\r\n', b'\r\nConnection: close\r\n\r\n')
  )
  assert _statuses(answer) == [b'200'] * 5
  assert answer.count(b'"body": 3') == 4


def test_many_small_requests_on_one_connection_are_not_a_431(served):
  port, _ = served
  sock = _connect(port)
  for _ in range(30):  # 30 x 1 header: over max_headers in all
    sock.sendall(_GET)
    sock.settimeout(5)
    assert sock.recv(65536)[9:12] == b'200'
  sock.close()


def test_upgrade_is_ignored(served):
  port, _ = served
  h2c = (
    b'POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\n'
    b'Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n'
    b'HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n'
    b'Content-Length: 5\r\n\r\nhello'
  )
  answer = _exchange(
    port, h2c, _GET.replace(b'\r\n\r\n', b'\r\nConnection: close\r\n\r\n')
  )
  assert _statuses(answer) == [b'200', b'200'], answer
  assert b'"body": 5' in answer
  # In two writes, and a GET.
  answer = _exchange(port, h2c[:-5], h2c[-5:])
  assert _statuses(answer)[:1] == [b'200'] and b'"body": 5' in answer
  websocket = (
    b'GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n'
    b'Upgrade: websocket\r\nConnection: close\r\n\r\n'
  )
  assert _statuses(_exchange(port, websocket)) == [b'200']
  connect = b'CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'
  # CONNECT (a tunnel, an upgrade to llhttp) is refused.
  assert _statuses(_exchange(port, connect))[0] in (b'400', b'405')


def test_a_new_address_gets_in_while_others_reconnect(served):
  port, _ = served
  stop = threading.Event()
  held = []

  def hold(source):
    """Keeps max_connections_per_client open, reconnecting each one cut."""
    mine = []
    while not stop.is_set():
      mine = [s for s in mine if s.fileno() != -1]
      for s in list(mine):
        s.setblocking(False)
        try:
          if s.recv(1024) == b'':
            s.close()
            mine.remove(s)
        except BlockingIOError:
          pass
        except OSError:
          s.close()
          mine.remove(s)
      while len(mine) < _LIMITS.max_connections_per_client:
        try:
          s = _connect(port, source)
          s.sendall(b'GET /x HTTP/1.1\r\n')  # and never more
          mine.append(s)
        except OSError:
          break
      time.sleep(0.01)
    held.extend(mine)

  # Four addresses of 6 connections each, against a total of 16.
  threads = [
    threading.Thread(target=hold, args=(f'127.0.0.{10 + i}',)) for i in range(4)
  ]
  for t in threads:
    t.start()
  try:
    time.sleep(0.5)
    for _ in range(5):
      answer = _exchange(
        port,
        _GET.replace(b'\r\n\r\n', b'\r\nConnection: close\r\n\r\n'),
        source='127.0.0.2',
      )
      assert _statuses(answer) == [b'200'], answer
      time.sleep(0.1)
  finally:
    stop.set()
    for t in threads:
      t.join()
    for s in held:
      s.close()


def test_duplicate_connection_counts_leave_nothing_behind(served):
  port, http = served
  deadline = time.monotonic() + 5
  while http.shared.clients and time.monotonic() < deadline:
    time.sleep(0.1)
  assert http.shared.clients == {}


def test_closed_connections_are_freed_without_the_garbage_collector(served):
  port, http = served
  before = sum(isinstance(o, http) for o in gc.get_objects())
  gc.disable()
  try:
    for i in range(60):
      kind = i % 4
      if kind == 0:
        _exchange(
          port, _GET.replace(b'\r\n\r\n', b'\r\nConnection: close\r\n\r\n')
        )
      elif kind == 1:
        _exchange(port, _CHUNKED + b'3\r\nabc\r\n0\r\n' + b'T: x\r\n' * 50)
      elif kind == 2:
        _exchange(port, _GET * 10)
      else:
        sock = _connect(port)
        sock.close()
    time.sleep(_LIMITS.header_timeout_s + 1.5)  # lingering ones close
    # Counted without collecting: objects only a cycle keeps are listed.
    after = sum(isinstance(o, http) for o in gc.get_objects())
  finally:
    gc.enable()
  assert after <= before, (before, after)


def test_drain_answers_new_connections_503(served):
  del served
  with _serving() as (port, http):
    http.shared.draining = True
    answer = _exchange(port, _GET)
    assert _statuses(answer) == [b'503'] and b'retry-after: 1' in answer
