r"""Captions over HTTP: `python -m capjax.serve --workdir DIR`.

  python -m capjax.serve --workdir /tmp/capjax-demo --port 8081
  curl -F image=@photo.jpg http://127.0.0.1:8081/v1/captions
  curl -H 'Content-Type: image/png' --data-binary @photo.png \
      'http://127.0.0.1:8081/v1/captions?beam_size=3&attention=true'

The model loads, the server listens, and the decoder compiles every shape a
request can need before it takes requests (GET /readyz). Endpoints,
batching and limits: capjax.serving.
"""

from collections.abc import Sequence

from absl import flags
from absl import logging

from capjax import errors
from capjax import inference
from capjax import programs
from capjax.data import images
from capjax.serving import app as app_lib
from capjax.serving import limits as limits_lib
from capjax.serving import server as server_lib
from capjax.serving import service as service_lib

_CHECKPOINT = programs.define_checkpoint_flags()
_HOST = flags.DEFINE_string(
  'host',
  '127.0.0.1',
  'Address to listen on '
  '(0.0.0.0: every interface; there is no '
  'authentication).',
)
_PORT = flags.DEFINE_integer(
  'port', 8081, 'Port (0: any free one).', lower_bound=0
)
_ALLOWED_HOSTS = flags.DEFINE_list(
  'allowed_hosts',
  None,
  'Host header names answered (others get 400); '
  'default: localhost, 127.0.0.1 and ::1 when --host is one of them, '
  'else any. "*": any.',
)
_MAX_BATCH_SIZE = flags.DEFINE_integer(
  'max_batch_size',
  32,
  'Most captions decoded together (1: one at a time).',
  lower_bound=1,
)
_MAX_WAIT_MS = flags.DEFINE_float(
  'max_wait_ms',
  5.0,
  'How long a beam search request may wait for others to batch with.',
  lower_bound=0,
)
_MAX_QUEUE = flags.DEFINE_integer(
  'max_queue',
  64,
  'Most requests waiting for the decoder, and most '
  'images waiting to be decoded; more get 503.',
  lower_bound=1,
)
_MAX_CONNECTIONS = flags.DEFINE_integer(
  'max_connections', 128, 'Most open connections; more get 503.', lower_bound=1
)
_MAX_CONNECTIONS_PER_CLIENT = flags.DEFINE_integer(
  'max_connections_per_client',
  32,
  'Most open connections from one address; more get 503.',
  lower_bound=1,
)
_HEADER_TIMEOUT_S = flags.DEFINE_float(
  'header_timeout_s',
  10.0,
  "Time a request's headers may take (from the "
  'connection or the previous answer); then 408 and close.',
  lower_bound=0.1,
)
_BODY_TIMEOUT_S = flags.DEFINE_float(
  'body_timeout_s',
  30.0,
  "Time a request's body may take; then 408.",
  lower_bound=0.1,
)
_KEEP_ALIVE_S = flags.DEFINE_float(
  'keep_alive_s',
  5.0,
  'How long an idle connection stays open.',
  lower_bound=0.1,
)
_MAX_REQUESTS_PER_CONNECTION = flags.DEFINE_integer(
  'max_requests_per_connection',
  1000,
  'Requests on one connection before it is closed.',
  lower_bound=1,
)
_REQUEST_TIMEOUT_S = flags.DEFINE_float(
  'request_timeout_s',
  60.0,
  'Time a request may wait for the decoder; then 503.',
  lower_bound=0.1,
)
_SHUTDOWN_TIMEOUT_S = flags.DEFINE_float(
  'shutdown_timeout_s',
  10.0,
  'Time a graceful stop (SIGTERM, SIGINT) may '
  'take: requests still waiting a second before it get 503.',
  lower_bound=1.0,
)
_MAX_BODY_BYTES = flags.DEFINE_integer(
  'max_body_bytes',
  10 * 2**20,
  'Largest request body or fetched image.',
  lower_bound=1,
)
_MAX_PIXELS = flags.DEFINE_integer(
  'max_pixels',
  images.MAX_PIXELS,
  'Largest image (width * height); '
  "the default is every capjax program's. --max_decode_mb bounds the "
  'memory too.',
  lower_bound=1,
)
_MAX_DECODE_MB = flags.DEFINE_integer(
  'max_decode_mb',
  512,
  'Most memory decoding one image may take, '
  'estimated from its header before decoding; larger images get 413. '
  'Large images are decoded one at a time.',
  lower_bound=1,
)
_DECODE_WORKERS = flags.DEFINE_integer(
  'decode_workers', 2, 'Threads decoding small images.', lower_bound=1
)
_MAX_BEAM_SIZE = flags.DEFINE_integer(
  'max_beam_size',
  4,
  'Largest beam_size a request may ask for (each size is compiled at start).',
  lower_bound=1,
)
_MAX_LEN = flags.DEFINE_integer(
  'max_len',
  0,
  "Default and largest max_len of a request; 0: the config's longest caption.",
  lower_bound=0,
)
_ALLOW_URL_FETCH = flags.DEFINE_boolean(
  'allow_url_fetch',
  False,
  'Caption images by URL ({"url": ...} bodies); public http(s) addresses only.',
)
_URL_TIMEOUT_S = flags.DEFINE_float(
  'url_timeout_s', 10.0, 'Time a URL fetch may take.', lower_bound=0.1
)


def _allowed_hosts() -> tuple[str, ...] | None:
  if _ALLOWED_HOSTS.value is None:
    return app_lib.allowed_hosts_for(_HOST.value)
  if '*' in _ALLOWED_HOSTS.value:
    return None
  return tuple(h.strip('[]').lower() for h in _ALLOWED_HOSTS.value)


def main(argv: Sequence[str]) -> None:
  programs.refuse_arguments(argv)
  options = service_lib.Options(
    max_batch_size=_MAX_BATCH_SIZE.value,
    max_wait_s=_MAX_WAIT_MS.value / 1000,
    max_queue=_MAX_QUEUE.value,
    max_body_bytes=_MAX_BODY_BYTES.value,
    max_pixels=_MAX_PIXELS.value,
    max_decode_bytes=_MAX_DECODE_MB.value * 2**20,
    decode_workers=_DECODE_WORKERS.value,
    max_beam_size=_MAX_BEAM_SIZE.value,
    max_len=_MAX_LEN.value or None,
    allow_url_fetch=_ALLOW_URL_FETCH.value,
    url_timeout_s=_URL_TIMEOUT_S.value,
    request_timeout_s=_REQUEST_TIMEOUT_S.value,
  )
  limits = limits_lib.Limits(
    max_connections=_MAX_CONNECTIONS.value,
    max_connections_per_client=_MAX_CONNECTIONS_PER_CLIENT.value,
    header_timeout_s=_HEADER_TIMEOUT_S.value,
    keep_alive_s=_KEEP_ALIVE_S.value,
    max_requests_per_connection=_MAX_REQUESTS_PER_CONNECTION.value,
    max_body_bytes=_MAX_BODY_BYTES.value,
  )
  trained = inference.load_trained(
    _CHECKPOINT.workdir.value, _CHECKPOINT.step.value
  )
  service = service_lib.Service(
    trained, inference.make_extractor(trained), options
  )
  try:
    sock = server_lib.bind(_HOST.value, _PORT.value)
  except OSError as e:
    raise errors.UserError(
      f'cannot listen on {_HOST.value} port {_PORT.value}: {e}'
    ) from None
  host, port = sock.getsockname()[:2]
  url = f'http://{f"[{host}]" if ":" in host else host}:{port}'
  app = app_lib.create_app(
    service=service,
    settings=app_lib.Settings(
      allowed_hosts=_allowed_hosts(), body_timeout_s=_BODY_TIMEOUT_S.value
    ),
    on_ready=lambda: logging.info(
      'serving on %s (model step %d)', url, trained.step
    ),
  )
  logging.info(
    'listening on %s; compiling the decoder for batches of %s '
    '(GET /readyz answers 200 once done)',
    url,
    ', '.join(map(str, service.batch_sizes)),
  )
  server_lib.serve(
    app, sock, limits, shutdown_timeout_s=_SHUTDOWN_TIMEOUT_S.value
  )
  logging.info('stopped')


if __name__ == '__main__':
  programs.run(main)
