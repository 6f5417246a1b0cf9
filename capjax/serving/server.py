"""The HTTP server: routes, bounded connections, JSON answers.

Endpoints:

  GET  /             a page to caption an image and see the attention behind
                     each word
  GET  /healthz      {"status": "ok"} while the decoder is running
  GET  /v1/model     the model, vocabulary, extractor, decoding and limits
  POST /v1/captions  an image (multipart field `image`, or the raw body as
                     image/* or application/octet-stream) -> {"caption",
                     "tokens", "token_ids", "log_prob", ...}; parameters
                     beam_size, max_len and attention=true as query or form
                     fields
"""

from collections.abc import Mapping
import http
import http.server
import importlib.resources
import json
import socket
import sys
import threading
import time
from typing import Any
import urllib.parse

from absl import logging

from capjax.serving import requests
from capjax.serving import service as service_lib

_LINGER_S = 1.0


def _page() -> bytes:
  return (importlib.resources.files('capjax') / 'static' /
          'index.html').read_bytes()


# The page runs only its own inline script and talks only to this server.
_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' blob: data:; "
                "connect-src 'self'")


class _Handler(http.server.BaseHTTPRequestHandler):
  """Routes requests to the service; every answer but the page is JSON."""
  protocol_version = 'HTTP/1.1'
  server_version = 'capjax'
  # Headers and body are separate writes: with Nagle's algorithm the body
  # would wait for the client's delayed ACK of the headers (40 ms).
  disable_nagle_algorithm = True
  # Seconds before an idle or stalled connection is closed.
  timeout = 30

  server: '_Server'

  def do_GET(self) -> None:  # pylint: disable=invalid-name
    self._dispatch()

  def do_POST(self) -> None:  # pylint: disable=invalid-name
    self._dispatch()

  def _dispatch(self) -> None:
    path = urllib.parse.urlsplit(self.path).path
    routes = {
        '/': {'GET': self._get_page},
        '/healthz': {'GET': self._get_health},
        '/v1/model': {'GET': self._get_model},
        '/v1/captions': {'POST': self._post_captions},
    }
    if self.command == 'GET' and ('Content-Length' in self.headers
                                  or 'Transfer-Encoding' in self.headers):
      self.close_connection = True  # its body is not read
    try:
      if path not in routes:
        raise requests.RequestError(404, f'no endpoint {path[:100]}; see GET /v1/model '
                                    'and POST /v1/captions')
      if self.command not in routes[path]:
        allowed = ', '.join(routes[path])
        raise requests.RequestError(405, f'{path} takes {allowed}', {'Allow': allowed})
      routes[path][self.command]()
    except requests.RequestError as e:
      self._send_json(e.status, {'error': str(e)}, e.headers)
    except TimeoutError:
      self._send_json(408, {'error': 'timed out reading the request'})
    except ConnectionError:
      self.close_connection = True  # the client left
    # A bug, not the client's mistake: log it and answer 500.
    except Exception:  # pylint: disable=broad-except
      logging.exception('%s %s failed', self.command, path)
      self._send_json(500, {'error': 'internal error; see the server log'})

  def _get_page(self) -> None:
    self._send(200, self.server.page, 'text/html; charset=utf-8',
               {'Content-Security-Policy': _PAGE_POLICY})

  def _get_health(self) -> None:
    batcher = self.server.service.batcher
    if not batcher.alive:
      raise requests.RequestError(503, 'the decoder is not running')
    self._send_json(200, {'status': 'ok', 'queue': batcher.queue_size,
                          'decoded': batcher.num_decoded,
                          'batches': batcher.num_batches})

  def _get_model(self) -> None:
    self._send_json(200, self.server.service.model_info())

  def _post_captions(self) -> None:
    service = self.server.service
    try:
      query = urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query,
                                     keep_blank_values=True,
                                     max_num_fields=len(requests.PARAMETERS))
    except ValueError:
      raise requests.RequestError(400, 'too many query parameters; known: '
                                  f'{", ".join(requests.PARAMETERS)}') from None
    content_type, type_params = requests.parse_header(
        self.headers.get('Content-Type', ''))
    image, url = None, None
    if content_type == 'multipart/form-data':
      fields = requests.parse_multipart(type_params.get('boundary'), self._read_body())
      if 'image' not in fields:
        raise requests.RequestError(400, "multipart/form-data without an 'image' "
                                    'field')
      image = fields.pop('image')
      try:
        form = [(k, v.decode('utf-8')) for k, v in fields.items()]
      except UnicodeDecodeError:
        raise requests.RequestError(400, 'form fields must be UTF-8 text') from None
      params = requests.merge_params(query, form)
    elif content_type == 'application/json':
      try:
        body = json.loads(self._read_body())
      except ValueError as e:
        raise requests.RequestError(400, f'invalid JSON: {e}') from None
      if not isinstance(body, dict):
        raise requests.RequestError(400, 'send {"url": "http(s)://..."}')
      url = body.pop('url', None)
      params = requests.merge_params(query, body.items())
    elif (content_type.startswith('image/')
          or content_type in requests.RAW_IMAGE_TYPES):
      image = self._read_body()
      params = requests.merge_params(query)
    else:
      raise requests.RequestError(415, f'unsupported Content-Type {content_type!r}: '
                                  "send multipart/form-data with an 'image' field, or "
                                  'the image itself as image/jpeg, image/png or '
                                  'application/octet-stream')
    kind, attention = service.parse_params(params)
    if image is None:
      image = service.fetch(url)
    result = service.caption(image, kind)
    if not attention:
      result = {k: v for k, v in result.items()
                if k not in ('attention', 'attention_grid')}
    self._send_json(200, result)

  def _read_body(self) -> bytes:
    limit = self.server.service.options.max_body_bytes
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      return requests.read_chunked(self.rfile, limit)
    length = requests.content_length(self.headers, limit)
    body = self.rfile.read(length)
    if len(body) < length:
      raise requests.RequestError(400, f'body ended after {len(body)} of {length} '
                                  'bytes (Content-Length)')
    return body

  def handle_expect_100(self) -> bool:
    # Refuses an oversized body before the client sends it.
    if 'chunked' not in self.headers.get('Transfer-Encoding', '').lower():
      try:
        requests.content_length(self.headers,
                       self.server.service.options.max_body_bytes)
      except requests.RequestError as e:
        self._send_json(e.status, {'error': str(e)})
        return False
    return super().handle_expect_100()

  def send_error(self, code: int, message: str | None = None,
                 explain: str | None = None) -> None:
    # http.server's own refusals (a malformed request line, headers too
    # long, an unsupported method) in this service's JSON form.
    self._send_json(code, {'error': message or http.HTTPStatus(code).phrase})

  def _send_json(self, status: int, value: Any,
                 headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps(value, separators=(',', ':')).encode() + b'\n'
    self._send(status, body, 'application/json', headers or {})

  def _send(self, status: int, body: bytes, content_type: str,
            headers: Mapping[str, str]) -> None:
    if status >= 400:
      # The request's body may be partly unread: never reuse the connection.
      self.close_connection = True
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.send_header('X-Content-Type-Options', 'nosniff')
    for name, value in headers.items():
      self.send_header(name, value)
    if self.close_connection:
      self.send_header('Connection', 'close')
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, fmt: str, *args: Any) -> None:  # pylint: disable=arguments-renamed
    # A line per request is too many under load; --v=1 shows them.
    logging.vlog(1, '%s ' + fmt, self.address_string(), *args)


_BUSY_BODY = b'{"error":"too many connections; retry later"}\n'
_BUSY_RESPONSE = (
    b'HTTP/1.1 503 service_lib.Service Unavailable\r\nContent-Type: application/json\r\n'
    b'Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s'
    % (requests.RETRY_AFTER_S, len(_BUSY_BODY), _BUSY_BODY))


class _Server(http.server.ThreadingHTTPServer):
  """A thread per connection, at most max_connections of them."""
  daemon_threads = True
  # socketserver's default backlog of 5 drops connections that arrive
  # together: their clients retry a second later.
  request_queue_size = 128

  def __init__(self, address: tuple[str, int], service: service_lib.Service):
    self.address_family = (socket.AF_INET6 if ':' in address[0]
                           else socket.AF_INET)
    self.service = service
    self.page = _page()
    self._slots = threading.BoundedSemaphore(
        service.options.max_connections)
    super().__init__(address, _Handler, bind_and_activate=False)

  def process_request(self, request: socket.socket,
                      client_address: Any) -> None:
    if not self._slots.acquire(blocking=False):
      # Refused in the accepting thread, without a thread of its own.
      try:
        request.settimeout(0.1)
        request.sendall(_BUSY_RESPONSE)
      except OSError:
        pass
      self.close_request(request)
      return
    super().process_request(request, client_address)

  def process_request_thread(self, request: socket.socket,
                             client_address: Any) -> None:
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def shutdown_request(self, request: socket.socket) -> None:
    # Closing a socket with unread data resets the connection, and the
    # client loses the answer it is about to read (a 413 before its whole
    # body was read): read what it still sends, for a while, first.
    try:
      request.shutdown(socket.SHUT_WR)
      request.settimeout(_LINGER_S)
      deadline = time.monotonic() + _LINGER_S
      while time.monotonic() < deadline and request.recv(65536):
        pass
    except OSError:
      pass
    self.close_request(request)

  def handle_error(self, request: Any, client_address: Any) -> None:
    # Clients that vanish mid-answer are routine, not tracebacks.
    error = sys.exc_info()[1]
    if isinstance(error, (ConnectionError, TimeoutError)):
      logging.vlog(1, '%s: %s', client_address, error)
    else:
      logging.exception('serving %s failed', client_address)


def make_server(service: service_lib.Service, host: str, port: int,
                listen: bool = True) -> _Server:
  """An HTTP server of the service on host:port (0: any free port).

  Args:
    service: what it serves.
    host: the address to listen on.
    port: the port.
    listen: False only binds the port (so that a port in use fails early);
      connections are refused until `server_activate()`.

  Raises:
    OSError: the address cannot be bound.
  """
  server = _Server((host, port), service)
  try:
    server.server_bind()
    if listen:
      server.server_activate()
  except OSError:
    server.server_close()
    raise
  return server
