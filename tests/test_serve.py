"""capjax.serving and capjax.serve: the HTTP service, on 127.0.0.1.

Most tests talk to one `python -m capjax.serve` process. The queue-full test
runs the app in this process with a decoder it holds back, so that the
queue fills deterministically. Only loopback addresses are ever contacted:
URL-fetch tests use addresses the server must refuse before connecting, or a
local server with a policy that admits loopback only. Hostile clients are
in test_serve_attacks.py.
"""

import concurrent.futures
import functools
import http.client
import http.server
import io
import ipaddress
import json
import os
import pathlib
import shutil
import socket
import threading
import time
import urllib.parse

import numpy as np
from PIL import Image
import pytest

from capjax import inference
from capjax.data import images as images_lib
from capjax.model import decoding
from capjax.serving import app as app_lib
from capjax.serving import batcher as batcher_lib
from capjax.serving import bodies
from capjax.serving import continuous
from capjax.serving import fetch as fetch_lib
from capjax.serving import imaging
from capjax.serving import limits as limits_lib
from capjax.serving import requests
from capjax.serving import server as server_lib
from capjax.serving import service as service_lib
from capjax.testing import hostile_images
from capjax.testing import serving

# Limits of the test server, small so that breaking them is cheap.
_MAX_BODY_BYTES = 1_000_000
_MAX_PIXELS = 4_000_000
_MAX_BEAM_SIZE = 3


@pytest.fixture(scope='module')
def trained(trained_workdir):
  return inference.load_trained(trained_workdir)


@pytest.fixture(scope='module')
def examples(trained_workdir):
  return sorted(str(p) for p in (trained_workdir / 'examples').glob('*.png'))


@pytest.fixture(scope='module')
def expected(trained, examples):
  """capjax.sample's captions of the examples: {beam_size: [caption, ...]}."""
  return {
    k: [
      r.caption for r in inference.caption_files(trained, examples, beam_size=k)
    ]
    for k in (1, 3)
  }


@pytest.fixture(scope='module')
def server(trained_workdir, tmp_path_factory):
  """The URL of a `python -m capjax.serve` process, and its log file."""
  log = tmp_path_factory.mktemp('serve') / 'serve.log'
  process, url = serving.start_subprocess(
    [
      '--workdir',
      str(trained_workdir),
      '--allow_url_fetch',
      '--max_batch_size=8',
      f'--max_body_bytes={_MAX_BODY_BYTES}',
      f'--max_pixels={_MAX_PIXELS}',
      f'--max_beam_size={_MAX_BEAM_SIZE}',
    ],
    str(log),
    env=serving.compilation_cache_env(
      tmp_path_factory.getbasetemp() / 'jax-cache'
    ),
  )
  yield url, log
  process.terminate()
  assert process.wait(timeout=30) == 0


def request(url, method, path, body=None, headers=None):
  """(status, headers, JSON or bytes) of one request on a new connection."""
  parts = urllib.parse.urlsplit(url)
  connection = http.client.HTTPConnection(
    parts.hostname, parts.port, timeout=60
  )
  try:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
  finally:
    connection.close()
  if response.getheader('Content-Type') == 'application/json':
    data = json.loads(data)
  return response.status, response.headers, data


def multipart(fields, boundary='capjax-test-boundary'):
  """(body, Content-Type) of a multipart/form-data form of [(name, bytes)]."""
  fields = fields.items() if isinstance(fields, dict) else fields
  body = (
    b''.join(
      b'--%s\r\nContent-Disposition: form-data; name="%s"%s\r\n\r\n%s\r\n'
      % (
        boundary.encode(),
        name.encode(),
        b'; filename="x.png"' if name == 'image' else b'',
        value,
      )
      for name, value in fields
    )
    + b'--%s--\r\n' % boundary.encode()
  )
  return body, f'multipart/form-data; boundary={boundary}'


def post_image(url, data, query='', content_type='image/png'):
  return request(
    url, 'POST', f'/v1/captions{query}', data, {'Content-Type': content_type}
  )


def read(path):
  return pathlib.Path(path).read_bytes()


def encoded(image: Image.Image, image_format: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, image_format)
  return buffer.getvalue()


# --- Library functions --------------------------------------------------------


def test_batch_sizes_and_max_len_buckets():
  assert service_lib.batch_sizes(1) == (1,)
  assert service_lib.batch_sizes(8) == (1, 2, 4, 8)
  assert service_lib.batch_sizes(24) == (1, 2, 4, 8, 16, 24)
  assert requests.max_len_buckets(47) == (16, 32, 47)
  assert requests.max_len_buckets(16) == (16,)
  assert requests.max_len_buckets(5) == (5,)


class _FakeRows:
  """A Continuous decoder whose row `(key, n)` ends after n steps."""

  def __init__(self, capacity):
    self.capacity, self.rows, self.admitted = capacity, {}, []

  room = property(lambda self: self.capacity - len(self.rows))
  active = property(lambda self: len(self.rows))

  def admit(self, keys, kinds, items):
    self.admitted.append(list(items))
    self.rows.update({k: [item, 0] for k, item in zip(keys, items)})

  def step(self):
    for row in self.rows.values():
      row[1] += 1
    ended = [k for k, (item, t) in self.rows.items() if t >= item]
    return [(k, f'{self.rows.pop(k)[0]}:greedy') for k in ended]

  def abandon(self):
    keys, self.rows = list(self.rows), {}
    return keys

  def warm_up(self, stop):
    del stop


def test_batcher_joins_greedy_rows_and_batches_the_other_kinds():
  started, release = threading.Event(), threading.Event()
  batches = []

  def batch_fn(kind, items):
    started.set()
    release.wait(timeout=30)
    batches.append((kind, items))
    return [f'{kind}{i}' for i in items]

  rows = _FakeRows(capacity=2)
  batcher = batcher_lib.Batcher(
    rows,
    batch_fn,
    is_continuous=lambda kind: kind == 'g',
    max_batch_size=2,
    max_wait_s=0.01,
    max_queue=7,
  )
  with pytest.raises(requests.RequestError) as error:
    batcher.submit('a', 0)
  assert error.value.status == 503 and 'warming up' in str(error.value)
  batcher.start()
  deadline = time.monotonic() + 10
  while not batcher.ready and time.monotonic() < deadline:
    time.sleep(0.01)
  first = batcher.submit('a', 0)
  assert started.wait(timeout=10)
  # The worker is busy: these wait, in this order, and the queue fills.
  futures = [batcher.submit(k, i) for i, k in enumerate('abaab', 1)]
  greedy = [batcher.submit('g', n) for n in (3, 1)]
  with pytest.raises(requests.RequestError) as error:
    batcher.submit('g', 6)
  assert error.value.status == 503
  assert error.value.headers == {'Retry-After': '1'}
  release.set()
  assert first.result(timeout=10) == 'a0'
  assert [f.result(timeout=10) for f in futures] == [
    'a1',
    'b2',
    'a3',
    'a4',
    'b5',
  ]
  assert [f.result(timeout=10) for f in greedy] == ['3:greedy', '1:greedy']
  # Whole batches by kind, oldest first, up to max_batch_size; the greedy
  # rows joined the continuous decoder together.
  assert batches == [('a', [0]), ('a', [1, 3]), ('b', [2, 5]), ('a', [4])]
  assert rows.admitted == [[3, 1]]
  # Rows join as others leave; the room is never exceeded.
  more = [batcher.submit('g', n) for n in (4, 1, 1, 2)]
  assert [f.result(timeout=10) for f in more] == [
    '4:greedy',
    '1:greedy',
    '1:greedy',
    '2:greedy',
  ]
  assert all(len(a) <= 2 for a in rows.admitted)
  assert batcher.num_decoded == 12
  # Draining: what is still waiting at the deadline is refused.
  release.clear()
  started.clear()
  blocker = batcher.submit('a', 7)
  assert started.wait(timeout=10)
  late = batcher.submit('b', 8)
  batcher.drain(0.1)
  time.sleep(0.2)
  release.set()
  assert blocker.result(timeout=10) == 'a7'
  with pytest.raises(requests.RequestError) as error:
    late.result(timeout=10)
  assert error.value.status == 503 and 'shutting down' in str(error.value)
  with pytest.raises(requests.RequestError):
    batcher.submit('g', 1)
  batcher.stop()
  assert not batcher.alive


def test_continuous_rows_are_greedy_search(trained):
  """Rows joining and leaving at random: decoding.caption_features' answers."""
  rng = np.random.default_rng(0)
  features = rng.normal(size=(12,) + tuple(trained.feature_shape_LD)).astype(
    np.float32
  )
  max_len = decoding.max_caption_tokens(trained.config)
  rows = continuous.GreedyRows(
    trained.model, trained.params, trained.feature_shape_LD, max_len, (1, 2, 4)
  )
  rows.warm_up()
  lens = [max_len if i % 3 else 1 + i % 5 for i in range(12)]
  results, waiting = {}, list(range(12))
  while waiting or rows.active:
    take = min(int(rng.integers(0, 4)), rows.room, len(waiting))
    if take:
      rows.admit(
        waiting[:take],
        features[waiting[:take]],
        [lens[i] for i in waiting[:take]],
      )
      waiting = waiting[take:]
    results.update(rows.step())
  for i in range(12):
    want = decoding.caption_features(
      trained.params, features[i : i + 1], model=trained.model, max_len=lens[i]
    )
    length = int(want.lengths_B[0])
    assert (
      results[i].token_ids == np.asarray(want.tokens_BT[0, :length]).tolist()
    )
    assert results[i].log_prob == pytest.approx(
      float(want.log_prob_B[0]), rel=1e-5, abs=1e-5
    )
    np.testing.assert_allclose(
      results[i].attention_TL, want.attention_BTL[0, :length], atol=1e-6
    )


def test_forms_and_parameters():
  body, content_type = multipart(
    [('image', b'\r\n--x\r\n\x00\xff'), ('beam_size', b'3'), ('image', b'2')]
  )
  media_type = content_type.split(';')[0]
  params = {'boundary': content_type.split('=')[1]}
  assert media_type == 'multipart/form-data'
  assert bodies.parse_multipart(params, body, max_fields=4) == {
    'image': [b'\r\n--x\r\n\x00\xff', b'2'],
    'beam_size': [b'3'],
  }
  for bad in (body[:-5], b'--nope\r\n', b''):
    with pytest.raises(requests.RequestError) as error:
      bodies.parse_multipart(params, bad, max_fields=4)
    assert error.value.status == 400
  with pytest.raises(requests.RequestError):
    bodies.parse_multipart(params, body, max_fields=2)
  kind, attention = requests.parse_params(
    {'beam_size': '3', 'attention': 'true'}, max_beam_size=4, max_len=47
  )
  assert kind == requests.DecodeKind(beam_size=3, max_len=47) and attention
  # Greedy decoding keeps max_len; beam search rounds it up to a bucket.
  assert requests.parse_params(
    {'max_len': 2, 'attention': False}, max_beam_size=4, max_len=47
  ) == (requests.DecodeKind(1, 2), False)
  assert requests.parse_params(
    {'max_len': '20', 'beam_size': 2}, max_beam_size=4, max_len=47
  )[0] == (requests.DecodeKind(2, 32))
  for depth in (10, 5000):
    with pytest.raises(requests.RequestError) as error:
      bodies.parse_json_object(b'[' * depth + b']' * depth)
    assert error.value.status == 400


def test_image_pool_checks_memory_before_decoding():
  big = encoded(Image.new('RGB', (3000, 2000)), 'PNG')  # 6M pixels
  jpeg = encoded(Image.new('RGB', (3000, 2000)), 'JPEG')
  assert imaging.decode_bytes(big, 64) == 6_000_000 * 20
  # A JPEG decodes at the largest draft scale that keeps 64 pixels.
  assert imaging.decode_bytes(jpeg, 64) == 375 * 250 * 20
  assert imaging.decode_bytes(b'not an image', 64) is None
  # A progressive JPEG keeps its coefficients at full size: 3000 x 2000
  # luma and, subsampled 2 x 2, two chroma planes of 1500 x 1000.
  progressive = io.BytesIO()
  Image.new('RGB', (3000, 2000)).save(progressive, 'JPEG', progressive=True)
  assert imaging.decode_bytes(progressive.getvalue(), 64) == (
    375 * 250 * 20 + 2 * (3000 * 2000 + 2 * 1504 * 1000)
  )
  pool = imaging.ImagePool(
    lambda image: image,
    image_size=64,
    max_pixels=10**8,
    max_decode_bytes=100 * 2**20,
  )
  import asyncio  # noqa: PLC0415

  with pytest.raises(requests.RequestError) as error:
    asyncio.run(pool.prepare(big))
  assert error.value.status == 413 and 'MB' in str(error.value)
  # Large images are box-reduced while both sides stay >= the size.
  image = asyncio.run(pool.prepare(jpeg))
  assert image.shape == (83, 75, 3)
  assert imaging.box_reduce(np.full((130, 70, 3), 7, np.uint8), 64).shape == (
    65,
    70,
    3,
  )
  pool.close()


@pytest.mark.parametrize(
  'address, reason',
  [
    ('127.0.0.1', 'loopback'),
    ('::1', 'loopback'),
    ('10.1.2.3', 'private'),
    ('192.168.0.1', 'private'),
    ('169.254.169.254', 'link-local'),
    ('fe80::1', 'link-local'),
    ('224.0.0.1', 'multicast'),
    ('0.0.0.0', 'unspecified'),
    ('240.0.0.1', 'reserved'),
    ('::ffff:127.0.0.1', 'loopback'),
    ('100.64.0.1', 'non-global'),
    ('8.8.8.8', None),
    ('2001:4860:4860::8888', None),
  ],
)
def test_refused_addresses(address, reason):
  # Only classified: nothing is sent anywhere.
  assert fetch_lib.refused_reason(ipaddress.ip_address(address)) == reason


# --- The server ---------------------------------------------------------------


def test_captions_are_those_of_capjax_sample(
  server, trained, examples, expected
):
  url, _ = server
  for i, path in enumerate(examples):
    status, _, raw = post_image(url, read(path))
    assert status == 200, raw
    assert raw['caption'] == expected[1][i]
    assert raw['tokens'][-1] == '<end>'
    assert raw['tokens'][:-1] == raw['caption'].split()
    assert 'attention' not in raw
    # Chunked, as `curl -T -` sends it.
    data = read(path)
    chunked = (data[k : k + 100] for k in range(0, len(data), 100))
    assert post_image(url, chunked)[2]['caption'] == expected[1][i]
    body, content_type = multipart({'image': read(path), 'beam_size': b'3'})
    status, _, form = post_image(url, body, '?attention=true', content_type)
    assert status == 200, form
    assert form['caption'] == expected[3][i]
    assert form['beam_size'] == 3
    assert form['attention_grid'] == [4, 4]
    attention = np.array(form['attention'])
    assert attention.shape == (len(form['tokens']), 16)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-3)
  # Log-probabilities and max_len as the decoder gives them.
  extractor = inference.make_extractor(trained)
  features = extractor([images_lib.load_image(p) for p in examples])
  captions = decoding.caption_features(
    trained.params, features, model=trained.model, max_len=3
  )
  for i, path in enumerate(examples):
    _, _, short = post_image(url, read(path), '?max_len=3')
    assert (
      short['token_ids']
      == np.trim_zeros(np.asarray(captions.tokens_BT[i]), 'b').tolist()
    )
    assert short['log_prob'] == pytest.approx(
      float(captions.log_prob_B[i]), rel=1e-4
    )
  # A beam search's max_len is rounded up to a compiled bucket.
  _, _, beam = post_image(url, read(examples[0]), '?max_len=3&beam_size=2')
  assert (beam['max_len'], beam['beam_size']) == (16, 2)


def test_model_health_readiness_metrics_and_page(server, trained):
  url, _ = server
  status, headers, model = request(url, 'GET', '/v1/model')
  assert status == 200
  assert model['model']['step'] == trained.step == 200
  assert model['model']['units'] == 32
  assert model['vocab']['size'] == trained.vocab.size
  assert model['extractor']['name'] == 'patches'
  assert (
    model['extractor']['num_locations'],
    model['extractor']['feature_dim'],
  ) == (16, 784)
  assert model['decoding']['batch_sizes'] == [1, 2, 4, 8]
  assert model['decoding']['beam_max_len_buckets'] == [16, 32, 47]
  assert model['limits']['url_fetch'] is True
  assert headers['Cache-Control'] == 'no-store'
  assert 'Server' not in headers
  status, _, health = request(url, 'GET', '/healthz')
  assert status == 200 and health['status'] == 'ok' and health['ready']
  assert request(url, 'GET', '/readyz')[:3:2] == (200, {'status': 'ready'})
  status, headers, metrics = request(url, 'GET', '/metrics')
  assert status == 200 and headers['Content-Type'].startswith('text/plain')
  for name in (
    b'capjax_http_requests_total{route="/v1/model",status="200"}',
    b'capjax_http_request_duration_seconds_bucket',
    b'capjax_decoder_batch_size_bucket',
    b'capjax_decoder_queue_length',
    b'capjax_xla_compiles',
    b'capjax_ready 1.0',
  ):
    assert name in metrics, name
  status, headers, page = request(url, 'GET', '/')
  assert status == 200 and b'/v1/captions' in page
  policy = headers['Content-Security-Policy']
  assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
  assert headers['X-Frame-Options'] == 'DENY'
  assert b'http://' not in page and b'https://' not in page
  # HEAD: the headers of GET, no body.
  status, headers, body = request(url, 'HEAD', '/')
  assert (status, body) == (200, b'')
  assert int(headers['Content-Length']) == len(page)


def test_parallel_clients_get_their_own_captions(server, examples, expected):
  url, _ = server
  _, _, before = request(url, 'GET', '/healthz')
  jobs = [(i % len(examples), 1 if i % 3 else 3) for i in range(48)]

  def caption(job):
    i, beam_size = job
    status, _, answer = post_image(
      url, read(examples[i]), f'?beam_size={beam_size}'
    )
    assert status == 200, answer
    return answer['caption']

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    captions = list(pool.map(caption, jobs))
  assert captions == [expected[k][i] for i, k in jobs]
  _, _, after = request(url, 'GET', '/healthz')
  assert after['decoded'] - before['decoded'] == len(jobs)
  assert after['queue'] == 0


def _raw_exchange(url, data: bytes) -> bytes:
  """What the server answers to bytes sent as they are."""
  parts = urllib.parse.urlsplit(url)
  with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    answer = b''
    while chunk := s.recv(65536):
      answer += chunk
  return answer


def _headers_only(url, headers):
  """Sends a POST's headers but none of its body; returns status and JSON."""
  parts = urllib.parse.urlsplit(url)
  connection = http.client.HTTPConnection(
    parts.hostname, parts.port, timeout=30
  )
  try:
    connection.putrequest('POST', '/v1/captions')
    for name, value in headers.items():
      connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def test_bad_input_gets_4xx_json_and_the_server_stays_healthy(server, examples):
  url, log = server
  png = read(examples[0])
  jpeg = encoded(Image.open(examples[0]).convert('RGB'), 'JPEG')
  big_png = encoded(Image.new('RGB', (2500, 2000)), 'PNG')  # 5M pixels
  assert len(big_png) < _MAX_BODY_BYTES
  too_long = os.urandom(_MAX_BODY_BYTES + 1)
  no_image_form = multipart({'beam_size': b'2'})
  two_images_form = multipart([('image', png), ('image', png)])
  chunks = lambda: (b'x' * 100_000 for _ in range(12))
  cases = [
    (
      'empty body',
      ('POST', '/v1/captions', b'', {'Content-Type': 'image/png'}),
      400,
      'empty',
    ),
    (
      'not an image',
      ('POST', '/v1/captions', b'hello' * 100, {'Content-Type': 'image/jpeg'}),
      415,
      'not an image',
    ),
    (
      'truncated JPEG',
      (
        'POST',
        '/v1/captions',
        jpeg[: len(jpeg) // 2],
        {'Content-Type': 'image/jpeg'},
      ),
      400,
      'unreadable',
    ),
    (
      'truncated PNG',
      ('POST', '/v1/captions', png[:200], {'Content-Type': 'image/png'}),
      400,
      'unreadable',
    ),
    (
      'forged size',
      (
        'POST',
        '/v1/captions',
        hostile_images.png_claiming_size(5000, 5000),
        {'Content-Type': 'image/png'},
      ),
      413,
      'image of 5000x5000 pixels is over the limit of 4,000,000 pixels',
    ),
    (
      'decompression bomb',
      (
        'POST',
        '/v1/captions',
        hostile_images.png_claiming_size(100_000, 100_000),
        {'Content-Type': 'image/png'},
      ),
      413,
      # Refused by PIL as it opens the image, named with capjax's limit.
      'image of 10,000,000,000 pixels is over the limit of 4,000,000 pixels',
    ),
    (
      'too many pixels',
      ('POST', '/v1/captions', big_png, {'Content-Type': 'image/png'}),
      413,
      'pixels',
    ),
    (
      'body too long',
      ('POST', '/v1/captions', too_long, {'Content-Type': 'image/png'}),
      413,
      'limit',
    ),
    (
      'chunked body too long',
      ('POST', '/v1/captions', chunks(), {'Content-Type': 'image/png'}),
      413,
      'limit',
    ),
    (
      'text',
      ('POST', '/v1/captions', png, {'Content-Type': 'text/plain'}),
      415,
      'Content-Type',
    ),
    ('no content type', ('POST', '/v1/captions', png, {}), 415, 'Content-Type'),
    (
      'form without image',
      (
        'POST',
        '/v1/captions',
        no_image_form[0],
        {'Content-Type': no_image_form[1]},
      ),
      400,
      "one 'image' field, got 0",
    ),
    (
      'form with two images',
      (
        'POST',
        '/v1/captions',
        two_images_form[0],
        {'Content-Type': two_images_form[1]},
      ),
      400,
      "one 'image' field, got 2",
    ),
    (
      'malformed form',
      (
        'POST',
        '/v1/captions',
        b'--b\r\nnope',
        {'Content-Type': 'multipart/form-data; boundary=b'},
      ),
      400,
      'malformed',
    ),
    (
      'bad JSON',
      (
        'POST',
        '/v1/captions',
        b'{"url":',
        {'Content-Type': 'application/json'},
      ),
      400,
      'JSON',
    ),
    (
      'not http',
      (
        'POST',
        '/v1/captions',
        b'{"url": "file:///etc/passwd"}',
        {'Content-Type': 'application/json'},
      ),
      400,
      'http',
    ),
    ('unknown path', ('GET', '/v2/nothing', None, {}), 404, 'no endpoint'),
    ('wrong method', ('GET', '/v1/captions', None, {}), 405, 'POST'),
    ('other method', ('PUT', '/v1/captions', png, {}), 405, 'POST'),
  ]
  for query, message in [
    ('beam_size=0', 'beam_size must be an integer from 1 to 3'),
    ('beam_size=abc', 'beam_size'),
    ('beam_size=99', 'beam_size'),
    ('beam_size=1.5', 'beam_size'),
    ('max_len=0', 'max_len'),
    ('max_len=' + '9' * 5000, 'max_len'),
    ('attention=maybe', 'attention'),
    ('colour=red', 'unknown parameter'),
    ('a=1&b=2&c=3&d=4', 'too many parameters'),
    ('beam_size=1&beam_size=2', 'given twice'),
  ]:
    cases.append(
      (
        query,
        ('POST', f'/v1/captions?{query}', png, {'Content-Type': 'image/png'}),
        400,
        message,
      )
    )
  # Refused before any connection is made, whatever the host answers.
  for target, reason in [
    ('127.0.0.1', 'loopback'),
    ('localhost:8081', 'loopback'),
    ('[::1]', 'loopback'),
    ('10.0.0.1', 'private'),
    ('169.254.169.254/latest/meta-data/', 'link-local'),
  ]:
    body = json.dumps({'url': f'http://{target}'}).encode()
    cases.append(
      (
        f'fetch {target}',
        ('POST', '/v1/captions', body, {'Content-Type': 'application/json'}),
        403,
        f'a {reason} address',
      )
    )

  for name, args, status, message in cases:
    got, headers, answer = request(url, *args)
    assert (got, message in answer.get('error', '')) == (status, True), (
      name,
      answer,
    )
    assert headers['Connection'] == 'close', name
  # Requests cut short or malformed below HTTP's usual clients.
  assert (
    _headers_only(
      url, {'Content-Type': 'image/png', 'Content-Length': '10000000000'}
    )[0]
    == 413
  )
  assert _headers_only(url, {'Content-Type': 'image/png'})[0] == 411
  assert (
    _headers_only(url, {'Content-Type': 'image/png', 'Content-Length': '-1'})[0]
    == 400
  )
  assert b'"error"' in _raw_exchange(url, b'GARBAGE\r\n\r\n')
  answer = _raw_exchange(
    url, b'GET /healthz HTTP/1.1\r\nX: %s\r\n\r\n' % (b'a' * 70_000)
  )
  assert answer.startswith(b'HTTP/1.1 431') and b'"error"' in answer
  answer = _raw_exchange(
    url,
    b'POST /v1/captions HTTP/1.1\r\nHost: '
    b'127.0.0.1\r\nContent-Type: image/png\r\n'
    b'Content-Length: 500\r\n\r\nshort',
  )
  assert answer.startswith(b'HTTP/1.1 400') and b'body ended' in answer

  status, _, health = request(url, 'GET', '/healthz')
  assert status == 200 and health['status'] == 'ok'
  assert post_image(url, png)[0] == 200
  assert 'Traceback' not in log.read_text()


def test_hostile_image_files_get_the_openers_answers(server):
  """Each file of capjax.testing.hostile_images, posted as a request body.

  A file the opener refuses gets its error's status and message; the others
  are captioned, except the huge one: the server's pixel limit is lower. An
  empty body is the request's fault (400), before any image is looked at.
  """
  url, log = server
  for name, (make, want) in sorted(hostile_images.CASES.items()):
    status, _, answer = post_image(url, make(), content_type='image/*')
    if name.startswith('huge'):
      want = images_lib.ImageTooLarge
    if isinstance(want, type):
      expected_status = 400 if name == 'empty.png' else want.http_status
      assert status == expected_status, (name, status, answer)
      assert answer['error'] and '\n' not in answer['error'], name
    else:
      assert status == 200 and answer['caption'], (name, answer)
  assert 'Traceback' not in log.read_text()


# --- Queue limit and URL fetching, in this process -------------------------


class _HeldBack:
  """A GreedyDecoder whose steps wait for `release`."""

  def __init__(self, decoder):
    self._decoder = decoder
    self.started, self.release = threading.Event(), threading.Event()

  room = property(lambda self: self._decoder.room)
  active = property(lambda self: self._decoder.active)

  def admit(self, *args):
    self._decoder.admit(*args)

  def step(self):
    self.started.set()
    self.release.wait(timeout=60)
    return self._decoder.step()

  def abandon(self):
    return self._decoder.abandon()

  def warm_up(self, stop):
    self._decoder.warm_up(stop)


@pytest.fixture
def held_back_server(trained):
  """An app in this process whose decoder waits; one waiting request at most."""
  extractor = inference.make_extractor(trained)
  options = service_lib.Options(max_batch_size=2, max_queue=1, max_beam_size=1)
  held = _HeldBack(
    service_lib.GreedyDecoder(
      trained,
      extractor,
      decoding.max_caption_tokens(trained.config),
      service_lib.batch_sizes(options.max_batch_size),
    )
  )
  service = service_lib.Service(trained, extractor, options, greedy=held)
  app = app_lib.create_app(service=service)
  sock = server_lib.bind('127.0.0.1', 0)
  server = server_lib.make_server(
    app, limits_lib.Limits(), shutdown_timeout_s=2
  )
  thread = threading.Thread(
    target=server.run, kwargs={'sockets': [sock]}, daemon=True
  )
  thread.start()
  url = f'http://127.0.0.1:{sock.getsockname()[1]}'
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:
    try:
      if request(url, 'GET', '/readyz')[0] == 200:
        break
    except OSError:
      pass
    time.sleep(0.1)
  yield url, service, held
  held.release.set()
  server.should_exit = True
  thread.join(timeout=30)


def test_full_queue_answers_503_and_an_idle_decoder_runs_a_row_at_once(
  held_back_server, examples, expected
):
  url, service, held = held_back_server
  png = read(examples[0])
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    decoding_now = pool.submit(post_image, url, png)
    assert held.started.wait(timeout=60)
    waiting = pool.submit(post_image, url, png)
    deadline = time.monotonic() + 30
    while service.batcher.queue_size < 1 and time.monotonic() < deadline:
      time.sleep(0.01)
    status, headers, answer = post_image(url, png)
    assert status == 503
    assert headers['Retry-After'] == '1'
    assert 'busy' in answer['error']
    held.release.set()
    for future in (decoding_now, waiting):
      status, _, answer = future.result()
      assert (status, answer['caption']) == (200, expected[1][0])
  # Each request came to an idle decoder alone: its row ran to its end in
  # one call, not one call per step_s (rows admitted together join and
  # leave between steps: test_continuous_rows_are_greedy_search).
  metrics = request(url, 'GET', '/metrics')[2].decode()
  rows = [
    line
    for line in metrics.splitlines()
    if line.startswith('capjax_decoder_rows_per_step_bucket{le="1.0"}')
    or line.startswith('capjax_decoder_rows_per_step_count')
  ]
  at_most_one, calls = (float(line.split()[-1]) for line in rows)
  assert calls == at_most_one == 2


def test_url_fetch_is_off_by_default(held_back_server):
  url = held_back_server[0]
  status, _, answer = request(
    url,
    'POST',
    '/v1/captions',
    b'{"url": "http://127.0.0.1/"}',
    {'Content-Type': 'application/json'},
  )
  assert status == 403 and '--allow_url_fetch' in answer['error']


class _Files(http.server.BaseHTTPRequestHandler):
  """A loopback web server: /image, /big, /slow and /redirect?to=URL."""

  image = b''

  def do_GET(self):
    path, _, query = self.path.partition('?')
    if path == '/redirect':
      self.send_response(302)
      self.send_header('Location', urllib.parse.parse_qs(query)['to'][0])
      self.end_headers()
      return
    if path == '/slow':
      time.sleep(2)
    body = b'x' * 5000 if path == '/big' else self.image
    try:
      self.send_response(200)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)
    except ConnectionError:
      pass  # /slow's client has given up

  def log_message(self, *args):
    pass


@pytest.fixture(scope='module')
def files_url(examples):
  handler = type('Files', (_Files,), {'image': read(examples[0])})
  files = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=files.serve_forever, daemon=True).start()
  yield f'http://127.0.0.1:{files.server_address[1]}'
  files.shutdown()
  files.server_close()


def _loopback_only(address):
  """Admits loopback only, so that tests can fetch from a local server."""
  return None if address.is_loopback else 'test-refused'


def test_fetch_url_follows_redirects_but_checks_each(files_url, examples):
  fetch = functools.partial(
    fetch_lib.fetch_url, max_bytes=1000, timeout_s=1.0, refuse=_loopback_only
  )
  image = read(examples[0])
  assert len(image) < 1000
  assert fetch(f'{files_url}/redirect?to=/image') == image
  for target in (
    'http://169.254.169.254/latest/meta-data/',
    'http://10.0.0.1/',
  ):
    with pytest.raises(requests.RequestError) as error:
      fetch(f'{files_url}/redirect?to={target}')
    assert error.value.status == 403
    assert urllib.parse.urlsplit(target).hostname in str(error.value)
  with pytest.raises(requests.RequestError) as error:
    fetch(f'{files_url}/big')
  assert error.value.status == 413
  with pytest.raises(requests.RequestError) as error:
    fetch(f'{files_url}/slow')
  assert error.value.status == 504
  # The default policy refuses the local server itself.
  with pytest.raises(requests.RequestError) as error:
    fetch_lib.fetch_url(f'{files_url}/image', max_bytes=1000, timeout_s=1.0)
  assert error.value.status == 403 and 'loopback' in str(error.value)


@pytest.mark.parametrize(
  'url', ['http://[::1/', 'http://[evil]/', 'http://x:99999/', 'ftp://x/']
)
def test_fetch_url_refuses_malformed_urls_with_a_400(url):
  with pytest.raises(requests.RequestError) as error:
    fetch_lib.fetch_url(url, max_bytes=1000, timeout_s=1.0)
  assert error.value.status == 400


def test_fetch_url_refuses_a_redirect_to_a_malformed_url(files_url):
  with pytest.raises(requests.RequestError) as error:
    fetch_lib.fetch_url(
      f'{files_url}/redirect?to=http://[evil/',
      max_bytes=1000,
      timeout_s=1.0,
      refuse=_loopback_only,
    )
  assert error.value.status in (400, 502)


def test_fetch_url_deadline_is_for_the_whole_fetch():
  """A remote sending a header byte every 0.3 s, under a 1 s limit."""
  listener = socket.create_server(('127.0.0.1', 0))
  stop = threading.Event()

  def dribble():
    connection, _ = listener.accept()
    with connection:
      for byte in b'HTTP/1.1 200 OK\r\n' + b'X: y\r\n' * 100:
        if stop.is_set():
          return
        try:
          connection.send(bytes([byte]))
        except OSError:
          return
        time.sleep(0.3)

  thread = threading.Thread(target=dribble, daemon=True)
  thread.start()
  start = time.monotonic()
  try:
    with pytest.raises(requests.RequestError) as error:
      fetch_lib.fetch_url(
        f'http://127.0.0.1:{listener.getsockname()[1]}/',
        max_bytes=1000,
        timeout_s=1.0,
        refuse=_loopback_only,
      )
  finally:
    stop.set()
    listener.close()
  assert error.value.status == 504
  assert time.monotonic() - start < 1.5


# --- The page in a browser ----------------------------------------------------

_CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'


# Pixel of the page's canvas at fractions (x, y) of its size: [r, g, b].
_PIXEL_JS = """([x, y]) => {
  const canvas = document.getElementById('view');
  return Array.from(canvas.getContext('2d').getImageData(
      Math.floor(x * canvas.width), Math.floor(y * canvas.height), 1, 1
  ).data.slice(0, 3));
}"""


@pytest.mark.parametrize('width, height', [(1280, 900), (390, 844)])
def test_page_shows_each_words_attention_in_chromium(
  server, examples, expected, tmp_path, width, height
):
  """Each word, chosen by pointer or arrow key, colours its highest cell.

  Screenshots of the page at a desktop and a phone size go to tmp_path.
  """
  playwright_api = pytest.importorskip(
    'playwright.sync_api', reason='the page test needs `pip install playwright`'
  )
  if not os.path.exists(_CHROMIUM):
    pytest.skip('the page test needs Chromium (apt-get install chromium)')
  url, _ = server
  status, _, answer = post_image(url, read(examples[1]), '?attention=true')
  assert status == 200
  rows, cols = answer['attention_grid']
  words = [t for t in answer['tokens'] if t != '<end>']

  def cell_centre(index):
    return ((index % cols + 0.5) / cols, (index // cols + 0.5) / rows)

  with playwright_api.sync_playwright() as p:
    browser = p.chromium.launch(
      executable_path=_CHROMIUM,
      args=[
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    )
    try:
      page = browser.new_page(viewport={'width': width, 'height': height})
      requested, errors = [], []
      page.on('request', lambda r: requested.append(r.url))
      page.on('console', lambda m: m.type == 'error' and errors.append(m.text))
      page.on('pageerror', lambda e: errors.append(str(e)))
      page.goto(url + '/')
      page.set_input_files('#image', examples[1])
      page.click('#submit')
      # A selector wait, not wait_for_function: polling a JavaScript string
      # needs eval, which the page's Content-Security-Policy forbids.
      page.wait_for_selector('#words button', timeout=30_000)
      shown = page.locator('#words button').all_inner_texts()
      details = page.inner_text('#details')
      # Nothing chosen: the image alone.
      page.keyboard.press('Escape')
      plain = {
        i: page.evaluate(_PIXEL_JS, cell_centre(i)) for i in range(rows * cols)
      }
      changes = []
      for t, word in enumerate(words):
        if t == 0:
          page.hover('#words li:first-child button')
        else:
          page.keyboard.press('ArrowRight')  # focus is on the word before
        assert (
          page.get_attribute(
            f'#words li:nth-child({t + 1}) button', 'aria-pressed'
          )
          == 'true'
        ), word
        weights = answer['attention'][t]
        top = max(range(len(weights)), key=weights.__getitem__)
        low = min(range(len(weights)), key=weights.__getitem__)
        changes.append(
          [
            sum(
              abs(a - b)
              for a, b in zip(
                page.evaluate(_PIXEL_JS, cell_centre(i)), plain[i]
              )
            )
            for i in (top, low)
          ]
        )
        if t == 0:
          page.screenshot(
            path=str(tmp_path / f'page_{width}x{height}.png'), full_page=True
          )
      # The opacity control fades the map out.
      page.fill('#opacity', '0')
      page.dispatch_event('#opacity', 'input')
      faded = page.evaluate(_PIXEL_JS, cell_centre(top))
      fits = page.evaluate('document.documentElement.scrollWidth') <= width
    finally:
      browser.close()
  assert shown == words and ' '.join(words) == expected[1][1]
  assert 'beam size 1' in details and ' ms' in details
  for word, (at_top, at_low) in zip(words, changes):
    # Coloured where the word's attention is highest, more than where it
    # is lowest.
    assert at_top > 30 and at_top >= at_low, (word, at_top, at_low)
  assert faded == plain[top]
  assert fits  # no sideways scrolling, at phone size too
  assert not errors
  assert all(r.startswith(url) for r in requested), requested
