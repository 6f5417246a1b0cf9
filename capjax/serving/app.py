"""The HTTP API as an ASGI app (Starlette): routes, checks, JSON answers.

Endpoints:

  GET  /             a page to caption an image and see the attention behind
                     each word
  GET  /healthz      200 {"status": "ok", ...} while the decoder's worker runs
  GET  /readyz       200 once warm-up has compiled every decoder shape; 503
                     before, and while shutting down
  GET  /metrics      Prometheus metrics
  GET  /v1/model     the model, vocabulary, extractor, decoding and limits
  POST /v1/captions  an image (multipart field `image`, or the raw body as
                     image/* or application/octet-stream) -> {"caption",
                     "tokens", "token_ids", "log_prob", ...}; parameters
                     beam_size, max_len and attention=true as query or form
                     fields

Every answer but the page and the metrics is JSON; a refusal is
`{"error": "..."}` with a 4xx or 503 status. GET routes also answer HEAD.

Run it with `python -m capjax.serve`, which adds connection limits and
timeouts (capjax.serving.server), or in any ASGI server:

  CAPJAX_WORKDIR=/tmp/capjax-demo uvicorn 'capjax.serving:create_app' --factory
"""

import contextlib
import dataclasses
import importlib.resources
import json
import os
import re
import time
from typing import Any
import urllib.parse

from absl import logging
from starlette import applications
from starlette import exceptions as starlette_exceptions
from starlette import requests as starlette_requests
from starlette import responses
from starlette import routing

from capjax import errors
from capjax import inference
from capjax.serving import bodies
from capjax.serving import metrics as metrics_lib
from capjax.serving import requests
from capjax.serving import service as service_lib

WORKDIR_ENV = 'CAPJAX_WORKDIR'
RAW_IMAGE_TYPES = ('application/octet-stream',)
LOOPBACK_HOSTS = ('localhost', '127.0.0.1', '::1')

# The page runs only its own inline script, talks only to this server, and
# may not be framed.
_PAGE_POLICY = (
  "default-src 'none'; script-src 'unsafe-inline'; "
  "style-src 'unsafe-inline'; img-src 'self' blob: data:; "
  "connect-src 'self'; base-uri 'none'; form-action 'none'; "
  "frame-ancestors 'none'"
)
_API_POLICY = "default-src 'none'; frame-ancestors 'none'"
_HEADERS = (
  (b'x-content-type-options', b'nosniff'),
  (b'x-frame-options', b'DENY'),
  (b'cache-control', b'no-store'),
  (b'referrer-policy', b'no-referrer'),
)
# RFC 9110's Host: a name or address and a port; no user information
# (`evil.example@127.0.0.1`), which urlsplit would skip.
_HOST = re.compile(r'(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{1,5})?')
_ROUTES = ('/', '/healthz', '/readyz', '/metrics', '/v1/model', '/v1/captions')


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the HTTP layer accepts.

  Attributes:
    allowed_hosts: the Host header values (without port) answered; None:
      any. Refusing other names stops DNS rebinding, where a web page's
      own name is made to resolve to this server.
    body_timeout_s: the time a request body may take to arrive.
  """

  allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
  body_timeout_s: float = 30.0


def allowed_hosts_for(bind_host: str) -> tuple[str, ...] | None:
  """The default allowed_hosts: loopback names when bound to loopback."""
  return LOOPBACK_HOSTS if bind_host in LOOPBACK_HOSTS + ('[::1]',) else None


def _json(
  status: int, value: Any, headers: dict[str, str] | None = None
) -> responses.Response:
  return responses.Response(
    json.dumps(value, separators=(',', ':')).encode() + b'\n',
    status,
    headers,
    media_type='application/json',
  )


def _error(error: requests.RequestError) -> responses.Response:
  return _json(error.status, {'error': str(error)}, error.headers)


def _page() -> bytes:
  return (
    importlib.resources.files('capjax') / 'static' / 'index.html'
  ).read_bytes()


# --- Endpoints ---------------------------------------------------------------


async def _get_page(request: starlette_requests.Request) -> responses.Response:
  return responses.Response(
    request.app.state.page,
    media_type='text/html; charset=utf-8',
    headers={'Content-Security-Policy': _PAGE_POLICY},
  )


async def _get_health(
  request: starlette_requests.Request,
) -> responses.Response:
  service = request.app.state.service
  batcher = service.batcher
  if not batcher.alive:
    raise requests.RequestError(503, 'the decoder is not running')
  return _json(
    200,
    {
      'status': 'ok',
      'ready': service.ready,
      'queue': batcher.queue_size,
      'decoded': batcher.num_decoded,
      'batches': batcher.num_batches,
      'decoder_calls': batcher.num_calls,
    },
  )


async def _get_ready(request: starlette_requests.Request) -> responses.Response:
  service = request.app.state.service
  if not service.ready:
    reason = (
      'shutting down'
      if service.batcher.ready
      else 'warming up: compiling the decoder'
    )
    raise requests.RequestError(503, f'not ready: {reason}')
  return _json(200, {'status': 'ready'})


async def _get_metrics(
  request: starlette_requests.Request,
) -> responses.Response:
  return responses.Response(
    request.app.state.service.metrics.text(),
    media_type=metrics_lib.CONTENT_TYPE,
  )


async def _get_model(request: starlette_requests.Request) -> responses.Response:
  return _json(200, request.app.state.service.model_info())


async def _post_captions(
  request: starlette_requests.Request,
) -> responses.Response:
  service: service_lib.Service = request.app.state.service
  settings: Settings = request.app.state.settings
  if not service.ready:
    raise requests.busy(
      'the server is warming up or shutting down; retry later'
    )
  query = request.query_params.multi_items()
  requests.check_fields([name for name, _ in query], len(requests.PARAMETERS))

  async def read(limit: int) -> bytes:
    start = time.monotonic()
    body = await bodies.read_body(
      request,
      limit=limit,
      timeout_s=settings.body_timeout_s,
      deadlines=request.app.state.deadlines,
    )
    service.metrics.phase['body'].observe(time.monotonic() - start)
    return body

  limit = service.options.max_body_bytes
  media_type, type_params = bodies.content_type(request)
  image, url = None, None
  if media_type == 'multipart/form-data':
    fields = bodies.parse_multipart(
      type_params, await read(limit), max_fields=1 + len(requests.PARAMETERS)
    )
    images = fields.pop('image', [])
    if len(images) != 1:
      raise requests.RequestError(
        400, f"multipart/form-data needs one 'image' field, got {len(images)}"
      )
    image = images[0]
    params = requests.merge_params(query, bodies.form_params(fields))
  elif media_type == 'application/json':
    body = bodies.parse_json_object(
      await read(min(limit, bodies.MAX_JSON_BYTES))
    )
    url = body.pop('url', None)
    params = requests.merge_params(query, body.items())
  elif media_type.startswith('image/') or media_type in RAW_IMAGE_TYPES:
    image = await read(limit)
    params = requests.merge_params(query)
  else:
    raise requests.RequestError(
      415,
      f'unsupported Content-Type {media_type[:100]!r}: send '
      "multipart/form-data with an 'image' field, or the image itself as "
      'image/jpeg, image/png or application/octet-stream',
    )
  kind, attention = service.parse_params(params)
  if image is None:
    image = await service.fetch(url)
  finished = await service.caption(image, kind)
  start = time.monotonic()
  response = _json(200, service.answer(kind, finished, attention))
  service.metrics.phase['answer'].observe(time.monotonic() - start)
  return response


# --- Checks around every request -------------------------------------------


def _refusal(
  scope: dict[str, Any], settings: Settings
) -> requests.RequestError | None:
  """Why the request's Host (or, for a POST, Origin) is refused; None: ok."""
  headers = starlette_requests.Headers(scope=scope)
  hosts = headers.getlist('host')
  if not hosts:
    if scope.get('http_version') == '1.0':
      return None
    return requests.RequestError(400, 'a Host header is required')
  if len(hosts) > 1:
    return requests.RequestError(400, 'send one Host header, not several')
  host = hosts[0]
  match = _HOST.fullmatch(host)
  if match is None:
    return requests.RequestError(
      400, f'Host {host[:100]!r} is not a host name or address, with a port'
    )
  name = match.group(1).strip('[]')
  if settings.allowed_hosts is not None and (
    name.lower() not in settings.allowed_hosts
  ):
    return requests.RequestError(
      400,
      f'Host {host[:100]!r} is not served here (allowed: '
      f'{", ".join(settings.allowed_hosts)}; see --allowed_hosts)',
    )
  if scope['method'] in ('GET', 'HEAD'):
    return None
  # Browsers send Origin with every cross-origin POST, and a form or a
  # fetch() of multipart/form-data needs no preflight: without this check
  # any web page could make its visitors' browsers post images here.
  origin = headers.get('origin')
  site = headers.get('sec-fetch-site', 'same-origin')
  if (
    origin is not None
    and urllib.parse.urlsplit(origin).netloc.lower() != host.lower()
  ) or site not in ('same-origin', 'none'):
    return requests.RequestError(
      403,
      "cross-origin requests are refused: post from this server's "
      'page, or from a program (without an Origin header)',
    )
  return None


class _Guard:
  """The outermost layer: Host and Origin checks, headers, metrics, 500s.

  Error answers close the connection: the request's body may be partly
  unread. A bug anywhere below is logged and answered with a JSON 500.
  """

  def __init__(self, app, settings: Settings, metrics: metrics_lib.Metrics):
    self._app = app
    self._settings = settings
    self._metrics = metrics

  async def __call__(self, scope, receive, send) -> None:
    if scope['type'] != 'http':
      await self._app(scope, receive, send)
      return
    start = time.monotonic()
    route = scope['path'] if scope['path'] in _ROUTES else 'other'
    status = []

    async def send_with_headers(message) -> None:
      if message['type'] == 'http.response.start':
        status.append(message['status'])
        headers = list(message.get('headers', [])) + list(_HEADERS)
        if not any(k == b'content-security-policy' for k, _ in headers):
          headers.append((b'content-security-policy', _API_POLICY.encode()))
        if message['status'] >= 400:
          headers.append((b'connection', b'close'))
        message = {**message, 'headers': headers}
      await send(message)

    try:
      error = _refusal(scope, self._settings)
      if error:
        await _error(error)(scope, receive, send_with_headers)
      else:
        await self._app(scope, receive, send_with_headers)
    except starlette_requests.ClientDisconnect:
      pass  # the client left; nothing to answer
    # A bug, not the client's mistake: log it and answer 500.
    except Exception:  # noqa: BLE001
      logging.exception('%s %s failed', scope['method'], route)
      if not status:
        await _json(500, {'error': 'internal error; see the server log'})(
          scope, receive, send_with_headers
        )
    finally:
      if status:
        self._metrics.requests.labels(route, str(status[0])).inc()
        self._metrics.latency.labels(route).observe(time.monotonic() - start)


async def _request_error(request, error: requests.RequestError):
  del request
  return _error(error)


async def _http_error(request, error: starlette_exceptions.HTTPException):
  if error.status_code == 404:
    message = (
      f'no endpoint {request.url.path[:100]}; see GET /v1/model and '
      'POST /v1/captions'
    )
  elif error.status_code == 405:
    # Starlette's router raises its 405s with an Allow header.
    assert error.headers is not None
    message = f'{request.url.path} takes {error.headers["Allow"]}'
  else:
    message = error.detail
  return _error(
    requests.RequestError(error.status_code, message, error.headers)
  )


def create_app(
  workdir: str | os.PathLike[str] | None = None,
  options: service_lib.Options | None = None,
  *,
  service: service_lib.Service | None = None,
  settings: Settings | None = None,
  on_ready=None,
) -> applications.Starlette:
  """The ASGI app of a trained workdir (or of a service already made).

  With no arguments (`uvicorn 'capjax.serving:create_app' --factory`), the
  workdir is $CAPJAX_WORKDIR and every option its default. The model loads
  here; the decoder warms up in the background once the app starts (see
  GET /readyz).

  Args:
    workdir: a trained workdir.
    options: the service's batching and limits.
    service: a service already made (then workdir and options are unused).
    settings: what the HTTP layer accepts; default: loopback Host names.
    on_ready: called once warm-up is done.

  Raises:
    UserError: no workdir given, or not a usable one.
  """
  if service is None:
    workdir = workdir or os.environ.get(WORKDIR_ENV)
    if not workdir:
      raise errors.UserError(f'give a workdir, or set ${WORKDIR_ENV}')
    trained = inference.load_trained(workdir)
    service = service_lib.Service(
      trained,
      inference.make_extractor(trained),
      options or service_lib.Options(),
    )
  settings = settings or Settings()

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    service.start(on_ready)
    try:
      yield
    finally:
      service.stop()

  app = applications.Starlette(
    routes=[
      routing.Route('/', _get_page, methods=['GET']),
      routing.Route('/healthz', _get_health, methods=['GET']),
      routing.Route('/readyz', _get_ready, methods=['GET']),
      routing.Route('/metrics', _get_metrics, methods=['GET']),
      routing.Route('/v1/model', _get_model, methods=['GET']),
      routing.Route('/v1/captions', _post_captions, methods=['POST']),
    ],
    # Starlette types every handler as taking any Exception, though it
    # calls each with the exceptions of its key's class only.
    exception_handlers={
      requests.RequestError: _request_error,  # type: ignore[dict-item]
      starlette_exceptions.HTTPException: _http_error,  # type: ignore[dict-item]
    },
    lifespan=lifespan,
  )
  app.state.service = service
  app.state.settings = settings
  app.state.page = _page()
  app.state.deadlines = bodies.Deadlines()
  app.add_middleware(_Guard, settings=settings, metrics=service.metrics)
  return app


def begin_shutdown(app: applications.Starlette, seconds: float) -> None:
  """Shutting down: bodies and queued requests get `seconds` to finish.

  Call in the event loop's thread. Readiness turns to 503 at once.
  """
  app.state.service.drain(seconds)
  app.state.deadlines.shutdown(seconds)
