r"""Captions over HTTP: `python -m capjax.serve --workdir DIR`.

  python -m capjax.serve --workdir /tmp/capjax-demo --port 8081
  curl -F image=@photo.jpg http://127.0.0.1:8081/v1/captions
  curl -H 'Content-Type: image/png' --data-binary @photo.png \
      'http://127.0.0.1:8081/v1/captions?beam_size=3&attention=true'

The model loads once and the decoder is compiled for every batch size before
the server listens. Endpoints, batching and limits: capjax.serving.
"""

from collections.abc import Sequence

from absl import flags
from absl import logging

from capjax import errors
from capjax import inference
from capjax import programs
from capjax.serving import server as server_lib
from capjax.serving import service as service_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir.',
                               required=True)
_STEP = flags.DEFINE_integer(
    'step', None, "The checkpoint's step; default: the newest.", lower_bound=0)
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on '
                            '(0.0.0.0: every interface; there is no '
                            'authentication).')
_PORT = flags.DEFINE_integer('port', 8081, 'Port (0: any free one).',
                             lower_bound=0)
_MAX_BATCH_SIZE = flags.DEFINE_integer(
    'max_batch_size', 32, 'Most images decoded together (1: one at a '
    'time).', lower_bound=1)
_MAX_WAIT_MS = flags.DEFINE_float(
    'max_wait_ms', 5.0, 'How long a request may wait for others to batch '
    'with.', lower_bound=0)
_MAX_QUEUE = flags.DEFINE_integer(
    'max_queue', 64, 'Most requests waiting for the decoder; more get 503.',
    lower_bound=1)
_MAX_CONNECTIONS = flags.DEFINE_integer(
    'max_connections', 128, 'Most connections served at once; more get '
    '503.', lower_bound=1)
_MAX_BODY_BYTES = flags.DEFINE_integer(
    'max_body_bytes', 10 * 2**20, 'Largest request body or fetched image.',
    lower_bound=1)
_MAX_PIXELS = flags.DEFINE_integer(
    'max_pixels', 25_000_000, 'Largest image (width * height).',
    lower_bound=1)
_MAX_BEAM_SIZE = flags.DEFINE_integer(
    'max_beam_size', 8, 'Largest beam_size a request may ask for.',
    lower_bound=1)
_MAX_LEN = flags.DEFINE_integer(
    'max_len', 0, "Default and largest max_len of a request; 0: the "
    "config's longest caption.", lower_bound=0)
_ALLOW_URL_FETCH = flags.DEFINE_boolean(
    'allow_url_fetch', False, 'Caption images by URL ({"url": ...} '
    'bodies); public http(s) addresses only.')
_URL_TIMEOUT_S = flags.DEFINE_float(
    'url_timeout_s', 10.0, 'Time a URL fetch may take.', lower_bound=0.1)


def main(argv: Sequence[str]) -> None:
  programs.refuse_arguments(argv)
  options = service_lib.Options(
      max_batch_size=_MAX_BATCH_SIZE.value,
      max_wait_s=_MAX_WAIT_MS.value / 1000, max_queue=_MAX_QUEUE.value,
      max_connections=_MAX_CONNECTIONS.value,
      max_body_bytes=_MAX_BODY_BYTES.value, max_pixels=_MAX_PIXELS.value,
      max_beam_size=_MAX_BEAM_SIZE.value, max_len=_MAX_LEN.value or None,
      allow_url_fetch=_ALLOW_URL_FETCH.value,
      url_timeout_s=_URL_TIMEOUT_S.value)
  trained = inference.load_trained(_WORKDIR.value, _STEP.value)
  service = service_lib.Service(trained, inference.make_extractor(trained),
                                options)
  try:
    server = server_lib.make_server(service, _HOST.value, _PORT.value,
                                    listen=False)
  except OSError as e:
    raise errors.UserError(
        f'cannot listen on {_HOST.value} port {_PORT.value}: {e}') from None
  logging.info('compiling the decoder for batches of %s',
               ', '.join(map(str, service.batch_sizes)))
  service.warm_up()
  service.start()
  server.server_activate()
  host, port = server.server_address[:2]
  logging.info('serving on http://%s:%d (model step %d)',
               f'[{host}]' if ':' in host else host, port, trained.step)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    service.stop()


if __name__ == '__main__':
  programs.run(main)
