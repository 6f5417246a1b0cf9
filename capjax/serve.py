r"""Captions over HTTP: `python -m capjax.serve --workdir DIR`.

  python -m capjax.serve --workdir /tmp/capjax-demo --port 8081
  curl -F image=@photo.jpg http://127.0.0.1:8081/v1/captions
  curl -H 'Content-Type: image/png' --data-binary @photo.png \
      'http://127.0.0.1:8081/v1/captions?beam_size=3&attention=true'

Endpoints:

  GET  /             a page to caption an image and see the attention behind
                     each word
  GET  /healthz      {"status": "ok"} while the decoder is running
  GET  /v1/model     the model, vocabulary, extractor, decoding and limits
  POST /v1/captions  an image (multipart field `image`, or the raw body as
                     image/* or application/octet-stream) -> {"caption",
                     "tokens", "token_ids", "log_prob", ...}; parameters
                     beam_size, max_len and attention=true (the attention
                     grid behind each token) as query or form fields

The model loads once. Each request is decoded and resized in its own thread,
then micro-batched: a worker thread takes the oldest waiting request and the
others of its kind (beam_size, max_len) that arrive within --max_wait_ms, up
to --max_batch_size, and runs the extractor and the jitted decoder on them as
one batch. Batches are padded to a few sizes (powers of two), each compiled
once; the default kind's are compiled before the server listens. At most
--max_queue requests wait; beyond that the answer is 503 with Retry-After.

Untrusted input is bounded before it costs much: the body (Content-Length,
and while reading a chunked body), the image's pixels (from its header,
before decoding), its format, the number of connections and the parameters'
ranges. A client's mistake is a 4xx answer `{"error": "..."}`.

Fetching images by URL (a JSON body `{"url": ...}`) is off unless
--allow_url_fetch. Then only http and https URLs of public addresses are
fetched: private, loopback, link-local, multicast and reserved addresses are
refused after DNS resolution and again on every redirect, and the connection
goes to the address that was checked; the body limit and --url_timeout_s
bound the download.
"""

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from collections.abc import Sequence
import collections
import concurrent.futures
import contextlib
import dataclasses
import email.message
import http
import http.client
import http.server
import importlib.resources
import io
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any
import urllib.parse

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from capjax import decode
from capjax import features as features_lib
from capjax import plots
from capjax import reporting
from capjax import sample

# Formats whose decoders are common and well exercised; others that PIL can
# read (EPS runs Ghostscript, for one) are refused.
IMAGE_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP')
# Raw bodies of these types (and any image/*) are images.
RAW_IMAGE_TYPES = ('application/octet-stream',)
PARAMETERS = ('beam_size', 'max_len', 'attention')
# Seconds a client is told to wait when the server is busy.
RETRY_AFTER_S = 1

_MAX_REDIRECTS = 3
_MAX_LINE = 1024  # bytes of a chunk-size or trailer line
_MAX_TRAILERS = 32
_LINGER_S = 1.0
_READY_PATTERN = re.compile(r'serving on (http://\S+)')


class RequestError(Exception):
  """A refused request: the HTTP status and a message for the client."""

  def __init__(self, status: int, message: str,
               headers: Mapping[str, str] | None = None):
    super().__init__(message)
    self.status = status
    self.headers = dict(headers or {})


def _busy(message: str) -> RequestError:
  return RequestError(503, message, {'Retry-After': str(RETRY_AFTER_S)})


@dataclasses.dataclass(frozen=True)
class Options:
  """How the service batches and what it accepts.

  Attributes:
    max_batch_size: the most images decoded together.
    max_wait_s: how long the oldest waiting request may wait for others.
    max_queue: the most requests waiting for the decoder.
    max_connections: the most connections served at once.
    max_body_bytes: the largest request body, and the largest fetched image.
    max_pixels: the largest image, width * height.
    max_beam_size: the largest beam_size a request may ask for.
    max_len: the default and largest max_len; None: the config's longest
      caption (`decode.max_caption_tokens`).
    allow_url_fetch: accept `{"url": ...}` bodies.
    url_timeout_s: the time a URL fetch may take.
    request_timeout_s: the time a request may wait for the decoder.
  """
  max_batch_size: int = 32
  max_wait_s: float = 0.005
  max_queue: int = 64
  max_connections: int = 128
  max_body_bytes: int = 10 * 2**20
  max_pixels: int = 25_000_000
  max_beam_size: int = 8
  max_len: int | None = None
  allow_url_fetch: bool = False
  url_timeout_s: float = 10.0
  request_timeout_s: float = 60.0


# --- Batching -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeKind:
  """What a request asks of the decoder; each kind is batched on its own."""
  beam_size: int
  max_len: int


# (kind, items) -> one result per item, in order.
BatchFn = Callable[[Hashable, list[Any]], list[Any]]


@dataclasses.dataclass(frozen=True)
class _Waiting:
  item: Any
  future: concurrent.futures.Future
  arrival: float


class Batcher:
  """Runs `batch_fn` in one worker thread on batches of same-kind requests.

  The worker takes the kind of the oldest waiting request and waits for more
  of it until max_batch_size wait, max_wait_s has passed since the oldest
  arrived, or no other request is on its way (see `expecting`), whichever
  comes first. A lone request thus goes at once, and requests that arrived
  while the worker was busy go together.
  """

  def __init__(self, batch_fn: BatchFn, *, max_batch_size: int,
               max_wait_s: float, max_queue: int):
    self._batch_fn = batch_fn
    self._max_batch_size = max_batch_size
    self._max_wait_s = max_wait_s
    self._max_queue = max_queue
    self._cond = threading.Condition()
    self._waiting: dict[Hashable, collections.deque[_Waiting]] = {}
    self._size = 0
    self._expected = 0
    self._stopped = False
    # Written by the worker only.
    self.num_batches = 0
    self.num_decoded = 0
    self._thread = threading.Thread(target=self._run, name='batcher',
                                    daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    """Stops the worker after its current batch; waiting requests fail."""
    with self._cond:
      self._stopped = True
      self._cond.notify_all()
    if self._thread.is_alive():
      self._thread.join()
    with self._cond:
      for queue in self._waiting.values():
        for waiting in queue:
          if waiting.future.set_running_or_notify_cancel():
            waiting.future.set_exception(
                _busy('the server is shutting down'))
      self._waiting.clear()
      self._size = 0

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  @property
  def queue_size(self) -> int:
    return self._size

  @contextlib.contextmanager
  def expecting(self) -> Iterator[None]:
    """Announces a request that will be submitted within the block.

    While it is being prepared (its image decoded), the worker waits for it
    (within max_wait_s) rather than start a batch without it.
    """
    with self._cond:
      self._expected += 1
    try:
      yield
    finally:
      with self._cond:
        self._expected -= 1
        self._cond.notify()

  def submit(self, kind: Hashable, item: Any) -> concurrent.futures.Future:
    """Queues an item; its future gets its result.

    Raises:
      RequestError: 503, the queue is full.
    """
    future = concurrent.futures.Future()
    with self._cond:
      if self._stopped:
        raise _busy('the server is shutting down')
      if self._size >= self._max_queue:
        raise _busy(f'the server is busy ({self._size} requests waiting); '
                    'retry later')
      self._waiting.setdefault(kind, collections.deque()).append(
          _Waiting(item, future, time.monotonic()))
      self._size += 1
      self._cond.notify()
    return future

  def _next_batch(self) -> tuple[Hashable, list[_Waiting]] | None:
    """Blocks for the next batch; None once stopped."""
    with self._cond:
      while not self._size and not self._stopped:
        self._cond.wait()
      if self._stopped:
        return None
      kind = min(self._waiting, key=lambda k: self._waiting[k][0].arrival)
      queue = self._waiting[kind]
      deadline = queue[0].arrival + self._max_wait_s
      while (len(queue) < self._max_batch_size and self._expected
             and not self._stopped
             and (left := deadline - time.monotonic()) > 0):
        self._cond.wait(left)
      batch = [queue.popleft()
               for _ in range(min(len(queue), self._max_batch_size))]
      if not queue:
        del self._waiting[kind]
      self._size -= len(batch)
      return kind, batch

  def _run(self) -> None:
    while (next_batch := self._next_batch()) is not None:
      kind, batch = next_batch
      # Requests that gave up waiting are cancelled; skip them.
      batch = [w for w in batch if w.future.set_running_or_notify_cancel()]
      if not batch:
        continue
      try:
        results = self._batch_fn(kind, [w.item for w in batch])
      # A failing batch fails its requests, never the worker.
      except Exception as e:  # pylint: disable=broad-except
        logging.exception('a batch of %d failed', len(batch))
        for w in batch:
          w.future.set_exception(e)
        continue
      self.num_batches += 1
      self.num_decoded += len(batch)
      for w, result in zip(batch, results):
        w.future.set_result(result)


def batch_sizes(max_batch_size: int) -> tuple[int, ...]:
  """The sizes batches are padded to: powers of two, and max_batch_size."""
  sizes = [1]
  while sizes[-1] * 2 < max_batch_size:
    sizes.append(sizes[-1] * 2)
  return tuple(sizes + [max_batch_size] if max_batch_size > 1 else sizes)


def caption_batch_fn(trained: sample.TrainedModel,
                     extractor: features_lib.Extractor,
                     sizes: Sequence[int]) -> BatchFn:
  """(DecodeKind, prepared images) -> one caption result per image.

  The batch is padded to the smallest of `sizes` that holds it, so that the
  decoder compiles once per size and kind, not once per batch length.
  """
  words = trained.vocab.words
  grid = list(plots.attention_grid(trained.feature_shape_LD[0]))

  def batch_fn(kind: DecodeKind, images: list[np.ndarray]) -> list[dict]:
    n = len(images)
    size = min(s for s in sizes if s >= n)
    # Copies of a real image, not blanks: decoding stops once every row has
    # ended, and a copy ends with its original.
    images_NSS3 = np.stack(images + images[:1] * (size - n))
    captions = jax.device_get(decode.caption_features(
        trained.params, extractor.features_fn(images_NSS3),
        model=trained.model, max_len=kind.max_len,
        beam_size=kind.beam_size))
    texts = decode.texts(captions.tokens_BT[:n], trained.vocab)
    results = []
    for i, text in enumerate(texts):
      length = int(captions.lengths_B[i])
      ids = captions.tokens_BT[i, :length].tolist()
      results.append({
          'caption': text,
          'tokens': [words[t] for t in ids],
          'token_ids': ids,
          'log_prob': float(captions.log_prob_B[i]),
          'beam_size': kind.beam_size,
          'max_len': kind.max_len,
          'attention_grid': grid,
          'attention': np.round(captions.attention_BTL[i, :length],
                                5).tolist(),
      })
    return results

  return batch_fn


# --- Requests -----------------------------------------------------------------


def read_image(data: bytes, max_pixels: int) -> np.ndarray:
  """Untrusted image bytes -> RGB uint8 (H, W, 3).

  The size comes from the header: an image over max_pixels is refused
  before it is decoded (a small file can hold a huge image).

  Raises:
    RequestError: 400 empty or unreadable, 413 too many pixels, 415 not an
      image of IMAGE_FORMATS.
  """
  if not data:
    raise RequestError(400, 'empty body: send an image (JPEG, PNG, ...)')
  try:
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
      width, height = image.size
  except Image.UnidentifiedImageError:
    raise RequestError(415, 'not an image, or not in a supported format '
                       f'({", ".join(IMAGE_FORMATS)})') from None
  except Image.DecompressionBombError as e:
    raise RequestError(413, str(e)) from None
  # PIL's parsers raise many types on malformed headers.
  except Exception as e:  # pylint: disable=broad-except
    raise RequestError(400, f'unreadable image: {e}') from None
  if width * height > max_pixels:
    raise RequestError(413, f'image of {width}x{height} pixels is over the '
                       f'limit of {max_pixels:,} pixels')
  try:
    return features_lib.load_image(data)
  # PIL's decoders raise many types on malformed data (OSError for a
  # truncated file, but also SyntaxError, EOFError, struct.error, ...).
  except Exception as e:  # pylint: disable=broad-except
    raise RequestError(400, f'unreadable image: {e}') from None


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


# --- Fetching images by URL ---------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Most specific first, so that 127.0.0.1 is named loopback, not private.
_REFUSED_KINDS = ('loopback', 'link_local', 'multicast', 'unspecified',
                  'reserved', 'private')


def refused_reason(address: Address) -> str | None:
  """Why an address must not be fetched from; None for a public address."""
  if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
    address = address.ipv4_mapped
  for kind in _REFUSED_KINDS:
    if getattr(address, f'is_{kind}'):
      return kind.replace('_', '-')
  return None if address.is_global else 'non-global'


def _checked_address(host: str, port: int,
                     refuse: Callable[[Address], str | None]) -> Address:
  """The address to connect to, once all the host resolves to are checked."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except (OSError, UnicodeError) as e:
    raise RequestError(400, f'cannot resolve {host!r}: {e}') from None
  addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
  for address in addresses:
    reason = refuse(address)
    if reason:
      raise RequestError(403, f'refusing to fetch from {host}: it resolves '
                         f'to {address}, a {reason} address')
  return addresses[0]


def _connect(scheme: str, host: str, port: int, address: Address,
             timeout_s: float) -> http.client.HTTPConnection:
  """A connection to `address` (already checked) that speaks to `host`.

  Connecting to the checked address, not the name, leaves no second DNS
  answer to slip a refused address in.
  """
  sock = socket.create_connection((str(address), port), timeout=timeout_s)
  if scheme == 'https':
    sock = ssl.create_default_context().wrap_socket(sock,
                                                    server_hostname=host)
    connection = http.client.HTTPSConnection(host, port, timeout=timeout_s)
  else:
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
  connection.sock = sock
  return connection


def fetch_url(url: str, *, max_bytes: int, timeout_s: float,
              refuse: Callable[[Address], str | None] = refused_reason
              ) -> bytes:
  """The body of an http(s) URL on a public address, following redirects.

  Args:
    url: the URL.
    max_bytes: the largest body.
    timeout_s: the time the whole fetch may take.
    refuse: address -> why it is refused, or None; checked for every
      address the host of the URL and of each redirect resolves to.

  Raises:
    RequestError: 400 a bad URL, 403 a refused address, 413 too large, 502
      the other server failed, 504 out of time.
  """
  deadline = time.monotonic() + timeout_s
  try:
    for _ in range(_MAX_REDIRECTS + 1):
      parts = urllib.parse.urlsplit(url)
      if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise RequestError(400, f'only http and https URLs are fetched, got '
                           f'{url[:200]!r}')
      try:
        port = parts.port or (443 if parts.scheme == 'https' else 80)
      except ValueError as e:
        raise RequestError(400, f'bad URL {url[:200]!r}: {e}') from None
      address = _checked_address(parts.hostname, port, refuse)
      connection = _connect(parts.scheme, parts.hostname, port, address,
                            max(deadline - time.monotonic(), 0.001))
      try:
        connection.request('GET', urllib.parse.urlunsplit(
            ('', '', parts.path or '/', parts.query, '')),
                           headers={'Accept': 'image/*'})
        response = connection.getresponse()
        location = response.getheader('Location')
        if response.status in (301, 302, 303, 307, 308) and location:
          url = urllib.parse.urljoin(url, location)
          continue
        if response.status != 200:
          raise RequestError(502, f'{parts.hostname} answered '
                             f'{response.status} {response.reason}')
        return _read_limited(response, max_bytes, deadline)
      finally:
        connection.close()
    raise RequestError(502, f'more than {_MAX_REDIRECTS} redirects')
  except TimeoutError:
    raise RequestError(504, f'fetching {url[:200]} took over {timeout_s} s'
                       ) from None
  except (OSError, http.client.HTTPException) as e:
    raise RequestError(502, f'cannot fetch {url[:200]}: {e}') from None


def _read_limited(response: http.client.HTTPResponse, max_bytes: int,
                  deadline: float) -> bytes:
  """The response body, refused once over max_bytes or past the deadline."""
  too_large = RequestError(413, f'the image at the URL is over the limit of '
                           f'{max_bytes:,} bytes')
  declared = response.getheader('Content-Length', '')
  if declared.isdigit() and int(declared) > max_bytes:
    raise too_large
  body = bytearray()
  while chunk := response.read1(65536):
    body += chunk
    if len(body) > max_bytes:
      raise too_large
    if time.monotonic() > deadline:
      raise TimeoutError
  return bytes(body)


# --- The service --------------------------------------------------------------


class Service:
  """The model, its extractor and the batcher; what the handlers call."""

  def __init__(self, trained: sample.TrainedModel,
               extractor: features_lib.Extractor, options: Options,
               batch_fn: BatchFn | None = None):
    """Makes the service; `start` it.

    Args:
      trained: the model.
      extractor: its feature extractor.
      options: batching and limits.
      batch_fn: replaces `caption_batch_fn` (tests slow it down).
    """
    self.trained = trained
    self.extractor = extractor
    self.options = options
    self.max_len = options.max_len or decode.max_caption_tokens(
        trained.config)
    self.batch_sizes = batch_sizes(options.max_batch_size)
    self._batch_fn = batch_fn or caption_batch_fn(trained, extractor,
                                                  self.batch_sizes)
    self.batcher = Batcher(self._batch_fn,
                           max_batch_size=options.max_batch_size,
                           max_wait_s=options.max_wait_s,
                           max_queue=options.max_queue)

  def warm_up(self) -> None:
    """Compiles the default kind's decoder for every batch size."""
    blank = np.zeros((self.extractor.image_size,) * 2 + (3,), np.float32)
    kind = DecodeKind(beam_size=1, max_len=self.max_len)
    for size in self.batch_sizes:
      self._batch_fn(kind, [blank] * size)

  def start(self) -> None:
    self.batcher.start()

  def stop(self) -> None:
    self.batcher.stop()

  def parse_params(self, params: Mapping[str, Any]) -> tuple[DecodeKind, bool]:
    return parse_params(params, max_beam_size=self.options.max_beam_size,
                        max_len=self.max_len)

  def caption(self, image: bytes, kind: DecodeKind) -> dict[str, Any]:
    """The caption of untrusted image bytes; RequestError for bad ones."""
    with self.batcher.expecting():
      prepared = self.extractor.prepare(
          read_image(image, self.options.max_pixels))
      future = self.batcher.submit(kind, prepared)
    try:
      return future.result(timeout=self.options.request_timeout_s)
    except concurrent.futures.TimeoutError:
      future.cancel()
      raise _busy('timed out waiting for the decoder; retry later') from None

  def fetch(self, url: Any) -> bytes:
    """The image at a URL from a request; RequestError if refused or off."""
    if not self.options.allow_url_fetch:
      raise RequestError(403, 'fetching images by URL is off; upload the '
                         'image, or start the server with --allow_url_fetch')
    if not isinstance(url, str):
      raise RequestError(400, 'send {"url": "http(s)://..."}')
    return fetch_url(url, max_bytes=self.options.max_body_bytes,
                     timeout_s=self.options.url_timeout_s)

  def model_info(self) -> dict[str, Any]:
    """What GET /v1/model answers."""
    t, o = self.trained, self.options
    num_locations, feature_dim = t.feature_shape_LD
    return {
        'model': {
            'step': t.step,
            'embedding_dim': t.model.embedding_dim,
            'units': t.model.units,
            'carry_gru_state': t.model.carry_gru_state,
            'num_parameters': sum(
                x.size for x in jax.tree_util.tree_leaves(t.params)),
        },
        'vocab': {'size': t.vocab.size},
        'extractor': {
            **t.feature_info['extractor'],
            'image_size': self.extractor.image_size,
            'num_locations': num_locations,
            'feature_dim': feature_dim,
            'attention_grid': list(plots.attention_grid(num_locations)),
        },
        'decoding': {
            'max_len': self.max_len,
            'max_beam_size': o.max_beam_size,
            'max_batch_size': o.max_batch_size,
            'batch_sizes': list(self.batch_sizes),
            'max_wait_ms': o.max_wait_s * 1000,
        },
        'limits': {
            'max_body_bytes': o.max_body_bytes,
            'max_pixels': o.max_pixels,
            'image_formats': list(IMAGE_FORMATS),
            'max_queue': o.max_queue,
            'url_fetch': o.allow_url_fetch,
        },
    }


# --- HTTP ---------------------------------------------------------------------


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
        raise RequestError(404, f'no endpoint {path[:100]}; see GET /v1/model '
                           'and POST /v1/captions')
      if self.command not in routes[path]:
        allowed = ', '.join(routes[path])
        raise RequestError(405, f'{path} takes {allowed}', {'Allow': allowed})
      routes[path][self.command]()
    except RequestError as e:
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
      raise RequestError(503, 'the decoder is not running')
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
                                     max_num_fields=len(PARAMETERS))
    except ValueError:
      raise RequestError(400, 'too many query parameters; known: '
                         f'{", ".join(PARAMETERS)}') from None
    content_type, type_params = parse_header(
        self.headers.get('Content-Type', ''))
    image, url = None, None
    if content_type == 'multipart/form-data':
      fields = parse_multipart(type_params.get('boundary'), self._read_body())
      if 'image' not in fields:
        raise RequestError(400, "multipart/form-data without an 'image' "
                           'field')
      image = fields.pop('image')
      try:
        form = [(k, v.decode('utf-8')) for k, v in fields.items()]
      except UnicodeDecodeError:
        raise RequestError(400, 'form fields must be UTF-8 text') from None
      params = merge_params(query, form)
    elif content_type == 'application/json':
      try:
        body = json.loads(self._read_body())
      except ValueError as e:
        raise RequestError(400, f'invalid JSON: {e}') from None
      if not isinstance(body, dict):
        raise RequestError(400, 'send {"url": "http(s)://..."}')
      url = body.pop('url', None)
      params = merge_params(query, body.items())
    elif (content_type.startswith('image/')
          or content_type in RAW_IMAGE_TYPES):
      image = self._read_body()
      params = merge_params(query)
    else:
      raise RequestError(415, f'unsupported Content-Type {content_type!r}: '
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
      return read_chunked(self.rfile, limit)
    length = content_length(self.headers, limit)
    body = self.rfile.read(length)
    if len(body) < length:
      raise RequestError(400, f'body ended after {len(body)} of {length} '
                         'bytes (Content-Length)')
    return body

  def handle_expect_100(self) -> bool:
    # Refuses an oversized body before the client sends it.
    if 'chunked' not in self.headers.get('Transfer-Encoding', '').lower():
      try:
        content_length(self.headers,
                       self.server.service.options.max_body_bytes)
      except RequestError as e:
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
    b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n'
    b'Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s'
    % (RETRY_AFTER_S, len(_BUSY_BODY), _BUSY_BODY))


class _Server(http.server.ThreadingHTTPServer):
  """A thread per connection, at most max_connections of them."""
  daemon_threads = True
  # socketserver's default backlog of 5 drops connections that arrive
  # together: their clients retry a second later.
  request_queue_size = 128

  def __init__(self, address: tuple[str, int], service: Service):
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


def make_server(service: Service, host: str, port: int,
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


def start_subprocess(args: Sequence[str], log_path: str,
                     timeout_s: float = 300.0
                     ) -> tuple[subprocess.Popen, str]:
  """Runs `python -m capjax.serve ARGS --port 0` until it listens.

  For tests and benchmarks: output goes to log_path.

  Returns:
    The process and the server's URL.

  Raises:
    RuntimeError: the server exited or did not listen within timeout_s.
  """
  with open(log_path, 'wb') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', 'capjax.serve', *args, '--port', '0'],
        stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and process.poll() is None:
    with open(log_path, encoding='utf-8', errors='replace') as log:
      if match := _READY_PATTERN.search(log.read()):
        return process, match.group(1)
    time.sleep(0.2)
  process.kill()
  process.wait()
  with open(log_path, encoding='utf-8', errors='replace') as log:
    raise RuntimeError(f'capjax.serve did not start:\n{log.read()[-3000:]}')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  reporting.concise_console_logging()
  # TensorFlow only decodes and featurises images here: keep it off the
  # accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  options = Options(
      max_batch_size=_MAX_BATCH_SIZE.value,
      max_wait_s=_MAX_WAIT_MS.value / 1000, max_queue=_MAX_QUEUE.value,
      max_connections=_MAX_CONNECTIONS.value,
      max_body_bytes=_MAX_BODY_BYTES.value, max_pixels=_MAX_PIXELS.value,
      max_beam_size=_MAX_BEAM_SIZE.value, max_len=_MAX_LEN.value or None,
      allow_url_fetch=_ALLOW_URL_FETCH.value,
      url_timeout_s=_URL_TIMEOUT_S.value)
  try:
    trained = sample.load_trained(_WORKDIR.value)
    service = Service(trained, sample.make_extractor(trained), options)
  except (FileNotFoundError, ValueError) as e:
    logging.error('%s', e)
    raise SystemExit(1) from None
  try:
    server = make_server(service, _HOST.value, _PORT.value, listen=False)
  except OSError as e:
    logging.error('cannot listen on %s port %d: %s', _HOST.value,
                  _PORT.value, e)
    raise SystemExit(1) from None
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
  # Flags exist only when run as a program, so that importing the library
  # never clashes with the flags of the program that imports it.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir.',
                                 required=True)
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
  app.run(main)
