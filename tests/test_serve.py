"""capjax.serving and capjax.serve: the HTTP service, against a real server on 127.0.0.1.

Most tests talk to one `python -m capjax.serve` process. The queue-full test
runs the server in this process with a decoder it holds back, so that the
queue fills deterministically. Only loopback addresses are ever contacted:
URL-fetch tests use addresses the server must refuse before connecting, or a
local server with a policy that admits loopback only.
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
import zlib

import numpy as np
from PIL import Image
import pytest

from capjax.model import decoding
from capjax import inference
from capjax.data import images as images_lib
from capjax.serving import batcher as batcher_lib
from capjax.serving import fetch as fetch_lib
from capjax.serving import requests
from capjax.serving import server as server_lib
from capjax.serving import service as service_lib
from capjax.testing import serving

# Limits of the test server, small so that breaking them is cheap.
_MAX_BODY_BYTES = 1_000_000
_MAX_PIXELS = 4_000_000
_MAX_BEAM_SIZE = 4


@pytest.fixture(scope='module')
def trained(trained_workdir):
  return inference.load_trained(trained_workdir)


@pytest.fixture(scope='module')
def examples(trained_workdir):
  return sorted(str(p) for p in (trained_workdir / 'examples').glob('*.png'))


@pytest.fixture(scope='module')
def expected(trained, examples):
  """capjax.sample's captions of the examples: {beam_size: [caption, ...]}."""
  return {k: [r.caption for r in inference.caption_files(trained, examples,
                                                      beam_size=k)]
          for k in (1, 3)}


@pytest.fixture(scope='module')
def server(trained_workdir, tmp_path_factory):
  """The URL of a `python -m capjax.serve` process, and its log file."""
  log = tmp_path_factory.mktemp('serve') / 'serve.log'
  process, url = serving.start_subprocess(
      ['--workdir', str(trained_workdir), '--allow_url_fetch',
       '--max_batch_size=8', f'--max_body_bytes={_MAX_BODY_BYTES}',
       f'--max_pixels={_MAX_PIXELS}', f'--max_beam_size={_MAX_BEAM_SIZE}'],
      str(log))
  yield url, log
  process.terminate()
  process.wait(timeout=30)


def request(url, method, path, body=None, headers=None):
  """(status, headers, JSON or bytes) of one request on a new connection."""
  parts = urllib.parse.urlsplit(url)
  connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                          timeout=60)
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
  """(body, Content-Type) of a multipart/form-data form of {name: bytes}."""
  body = b''.join(
      b'--%s\r\nContent-Disposition: form-data; name="%s"%s\r\n\r\n%s\r\n'
      % (boundary.encode(), name.encode(),
         b'; filename="x.png"' if name == 'image' else b'', value)
      for name, value in fields.items()) + b'--%s--\r\n' % boundary.encode()
  return body, f'multipart/form-data; boundary={boundary}'


def post_image(url, data, query='', content_type='image/png'):
  return request(url, 'POST', f'/v1/captions{query}', data,
                 {'Content-Type': content_type})


def read(path):
  return pathlib.Path(path).read_bytes()


def encoded(image: Image.Image, image_format: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, image_format)
  return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
  """A 1x1 PNG whose header claims width x height (a decompression bomb)."""
  data = bytearray(encoded(Image.new('RGB', (1, 1)), 'PNG'))
  ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
  data[ihdr:ihdr + 8] = width.to_bytes(4, 'big') + height.to_bytes(4, 'big')
  crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
  data[ihdr + 13:ihdr + 17] = crc.to_bytes(4, 'big')
  return bytes(data)


# --- Library functions --------------------------------------------------------


def test_batch_sizes():
  assert service_lib.batch_sizes(1) == (1,)
  assert service_lib.batch_sizes(8) == (1, 2, 4, 8)
  assert service_lib.batch_sizes(24) == (1, 2, 4, 8, 16, 24)


def test_batcher_batches_by_kind_up_to_the_batch_size():
  started, release = threading.Event(), threading.Event()
  batches = []

  def batch_fn(kind, items):
    started.set()
    release.wait()
    batches.append((kind, items))
    return [f'{kind}{i}' for i in items]

  batcher = batcher_lib.Batcher(batch_fn, max_batch_size=2, max_wait_s=0.01,
                          max_queue=5)
  batcher.start()
  first = batcher.submit('a', 0)
  started.wait()
  # The worker is busy: these wait, in this order, and the queue fills.
  futures = [batcher.submit(k, i) for i, k in enumerate('abaab', 1)]
  with pytest.raises(requests.RequestError) as error:
    batcher.submit('a', 6)
  assert error.value.status == 503
  assert error.value.headers == {'Retry-After': '1'}
  release.set()
  assert first.result() == 'a0'
  assert [f.result() for f in futures] == ['a1', 'b2', 'a3', 'a4', 'b5']
  batcher.stop()
  assert batches == [('a', [0]), ('a', [1, 3]), ('b', [2, 5]), ('a', [4])]
  assert (batcher.num_batches, batcher.num_decoded) == (4, 6)
  # A request on its way is waited for (max_wait_s allowing); then the
  # batch goes without waiting out max_wait_s.
  batcher = batcher_lib.Batcher(lambda kind, items: [items] * len(items),
                          max_batch_size=4, max_wait_s=60, max_queue=5)
  batcher.start()
  with batcher.expecting():
    first = batcher.submit('a', 0)
    time.sleep(0.05)
    second = batcher.submit('a', 1)
  assert (first.result(timeout=10), second.result(timeout=10)) == ([0, 1],
                                                                   [0, 1])
  assert (batcher.num_batches, batcher.num_decoded) == (1, 2)
  batcher.stop()


def test_multipart_and_parameters():
  body, content_type = multipart({'image': b'\r\n--x\r\n\x00\xff',
                                  'beam_size': b'3'})
  _, params = requests.parse_header(content_type)
  assert requests.parse_multipart(params['boundary'], body) == {
      'image': b'\r\n--x\r\n\x00\xff', 'beam_size': b'3'}
  kind, attention = requests.parse_params(
      {'beam_size': '3', 'attention': 'true'}, max_beam_size=4, max_len=9)
  assert kind == requests.DecodeKind(beam_size=3, max_len=9) and attention
  assert requests.parse_params({'max_len': 2, 'attention': False},
                            max_beam_size=4, max_len=9) == (
                                requests.DecodeKind(1, 2), False)


@pytest.mark.parametrize('address, reason', [
    ('127.0.0.1', 'loopback'), ('::1', 'loopback'), ('10.1.2.3', 'private'),
    ('192.168.0.1', 'private'), ('169.254.169.254', 'link-local'),
    ('fe80::1', 'link-local'), ('224.0.0.1', 'multicast'),
    ('0.0.0.0', 'unspecified'), ('240.0.0.1', 'reserved'),
    ('::ffff:127.0.0.1', 'loopback'), ('100.64.0.1', 'non-global'),
    ('8.8.8.8', None), ('2001:4860:4860::8888', None)])
def test_refused_addresses(address, reason):
  # Only classified: nothing is sent anywhere.
  assert fetch_lib.refused_reason(ipaddress.ip_address(address)) == reason


# --- The server ---------------------------------------------------------------


def test_captions_are_those_of_capjax_sample(server, trained, examples,
                                             expected):
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
    chunked = (data[k:k + 100] for k in range(0, len(data), 100))
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
  captions = decoding.caption_features(trained.params, features,
                                     model=trained.model, max_len=3)
  for i, path in enumerate(examples):
    _, _, short = post_image(url, read(path), '?max_len=3')
    assert short['token_ids'] == np.trim_zeros(
        np.asarray(captions.tokens_BT[i]), 'b').tolist()
    assert short['log_prob'] == pytest.approx(
        float(captions.log_prob_B[i]), rel=1e-4)


def test_model_health_and_page(server, trained):
  url, _ = server
  status, _, model = request(url, 'GET', '/v1/model')
  assert status == 200
  assert model['model']['step'] == trained.step == 200
  assert model['model']['units'] == 32
  assert model['vocab']['size'] == trained.vocab.size
  assert model['extractor']['name'] == 'patches'
  assert (model['extractor']['num_locations'],
          model['extractor']['feature_dim']) == (16, 784)
  assert model['decoding']['batch_sizes'] == [1, 2, 4, 8]
  assert model['limits']['url_fetch'] is True
  status, _, health = request(url, 'GET', '/healthz')
  assert status == 200 and health['status'] == 'ok'
  status, headers, page = request(url, 'GET', '/')
  assert status == 200 and b'/v1/captions' in page
  assert "default-src 'none'" in headers['Content-Security-Policy']
  assert b'http://' not in page and b'https://' not in page


def test_parallel_clients_get_their_own_captions(server, examples, expected):
  url, _ = server
  _, _, before = request(url, 'GET', '/healthz')
  jobs = [(i % len(examples), 1 if i % 3 else 3) for i in range(48)]

  def caption(job):
    i, beam_size = job
    status, _, answer = post_image(url, read(examples[i]),
                                   f'?beam_size={beam_size}')
    assert status == 200, answer
    return answer['caption']

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    captions = list(pool.map(caption, jobs))
  assert captions == [expected[k][i] for i, k in jobs]
  _, _, after = request(url, 'GET', '/healthz')
  assert after['decoded'] - before['decoded'] == len(jobs)
  # Concurrent requests shared batches.
  assert after['batches'] - before['batches'] < len(jobs)


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
  connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                          timeout=30)
  try:
    connection.putrequest('POST', '/v1/captions')
    for name, value in headers.items():
      connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def test_bad_input_gets_4xx_json_and_the_server_stays_healthy(server,
                                                              examples):
  url, log = server
  png = read(examples[0])
  jpeg = encoded(Image.open(examples[0]).convert('RGB'), 'JPEG')
  big_png = encoded(Image.new('RGB', (2500, 2000)), 'PNG')  # 5M pixels
  assert len(big_png) < _MAX_BODY_BYTES
  too_long = os.urandom(_MAX_BODY_BYTES + 1)
  no_image_form = multipart({'beam_size': b'2'})
  chunks = lambda: (b'x' * 100_000 for _ in range(12))
  cases = [
      ('empty body', ('POST', '/v1/captions', b'',
                      {'Content-Type': 'image/png'}), 400, 'empty'),
      ('not an image', ('POST', '/v1/captions', b'hello' * 100,
                        {'Content-Type': 'image/jpeg'}), 415, 'not an image'),
      ('truncated JPEG', ('POST', '/v1/captions', jpeg[:len(jpeg) // 2],
                          {'Content-Type': 'image/jpeg'}), 400, 'unreadable'),
      ('truncated PNG', ('POST', '/v1/captions', png[:200],
                         {'Content-Type': 'image/png'}), 400, 'unreadable'),
      ('forged size', ('POST', '/v1/captions', png_claiming_size(5000, 5000),
                       {'Content-Type': 'image/png'}), 413,
       'image of 5000x5000 pixels is over the limit of 4,000,000 pixels'),
      ('decompression bomb', ('POST', '/v1/captions',
                              png_claiming_size(100_000, 100_000),
                              {'Content-Type': 'image/png'}), 413,
       'decompression bomb'),
      ('too many pixels', ('POST', '/v1/captions', big_png,
                           {'Content-Type': 'image/png'}), 413, 'pixels'),
      ('body too long', ('POST', '/v1/captions', too_long,
                         {'Content-Type': 'image/png'}), 413, 'limit'),
      ('chunked body too long', ('POST', '/v1/captions', chunks(),
                                 {'Content-Type': 'image/png'}), 413,
       'limit'),
      ('text', ('POST', '/v1/captions', png, {'Content-Type': 'text/plain'}),
       415, 'Content-Type'),
      ('no content type', ('POST', '/v1/captions', png, {}), 415,
       'Content-Type'),
      ('form without image', ('POST', '/v1/captions', no_image_form[0],
                              {'Content-Type': no_image_form[1]}), 400,
       "'image' field"),
      ('malformed form', ('POST', '/v1/captions', b'--b\r\nnope',
                          {'Content-Type': 'multipart/form-data; boundary=b'}),
       400, 'malformed'),
      ('bad JSON', ('POST', '/v1/captions', b'{"url":',
                    {'Content-Type': 'application/json'}), 400, 'JSON'),
      ('not http', ('POST', '/v1/captions', b'{"url": "file:///etc/passwd"}',
                    {'Content-Type': 'application/json'}), 400, 'http'),
      ('unknown path', ('GET', '/v2/nothing', None, {}), 404, 'no endpoint'),
      ('wrong method', ('GET', '/v1/captions', None, {}), 405, 'POST'),
      ('unsupported method', ('PUT', '/v1/captions', png, {}), 501,
       'Unsupported method'),
  ]
  for query, message in [
      ('beam_size=0', 'beam_size must be an integer from 1 to 4'),
      ('beam_size=abc', 'beam_size'), ('beam_size=99', 'beam_size'),
      ('beam_size=1.5', 'beam_size'), ('max_len=0', 'max_len'),
      ('max_len=' + '9' * 5000, 'max_len'), ('attention=maybe', 'attention'),
      ('colour=red', 'unknown parameter'),
      ('a=1&b=2&c=3&d=4', 'too many query parameters'),
      ('beam_size=1&beam_size=2', 'given twice')]:
    cases.append((query, ('POST', f'/v1/captions?{query}', png,
                          {'Content-Type': 'image/png'}), 400, message))
  # Refused before any connection is made, whatever the host answers.
  for target, reason in [
      ('127.0.0.1', 'loopback'), ('localhost:8081', 'loopback'),
      ('[::1]', 'loopback'), ('10.0.0.1', 'private'),
      ('169.254.169.254/latest/meta-data/', 'link-local')]:
    body = json.dumps({'url': f'http://{target}'}).encode()
    cases.append((f'fetch {target}', ('POST', '/v1/captions', body,
                                      {'Content-Type': 'application/json'}),
                  403, f'a {reason} address'))

  for name, args, status, message in cases:
    got, _, answer = request(url, *args)
    assert (got, message in answer.get('error', '')) == (status, True), (
        name, answer)
  # Requests cut short or malformed below HTTP's usual clients.
  assert _headers_only(url, {'Content-Type': 'image/png',
                             'Content-Length': '10000000000'})[0] == 413
  assert _headers_only(url, {'Content-Type': 'image/png'})[0] == 411
  assert _headers_only(url, {'Content-Type': 'image/png',
                             'Content-Length': '-1'})[0] == 400
  assert b'"error"' in _raw_exchange(url, b'GARBAGE\r\n\r\n')
  answer = _raw_exchange(url, b'GET /healthz HTTP/1.1\r\nX: %s\r\n\r\n'
                         % (b'a' * 70_000))
  assert answer.startswith(b'HTTP/1.1 431') and b'"error"' in answer
  answer = _raw_exchange(url, b'POST /v1/captions HTTP/1.1\r\nContent-Type: '
                         b'image/png\r\nContent-Length: 500\r\n\r\nshort')
  assert answer.startswith(b'HTTP/1.1 400') and b'body ended' in answer

  status, _, health = request(url, 'GET', '/healthz')
  assert status == 200 and health['status'] == 'ok'
  assert post_image(url, png)[0] == 200
  assert 'Traceback' not in log.read_text()


# --- Queue limit and URL fetching, in this process -------------------------


@pytest.fixture
def held_back_server(trained):
  """A server whose decoder waits for `release`; one waiting request at most."""
  started, release = threading.Event(), threading.Event()
  extractor = inference.make_extractor(trained)
  options = service_lib.Options(max_batch_size=1, max_queue=1)
  caption = service_lib.caption_batch_fn(trained, extractor, (1,))

  def held_back(kind, images):
    started.set()
    release.wait(timeout=60)
    return caption(kind, images)

  service = service_lib.Service(trained, extractor, options, batch_fn=held_back)
  service.start()
  server = server_lib.make_server(service, '127.0.0.1', 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  url = f'http://127.0.0.1:{server.server_address[1]}'
  yield url, service, started, release
  release.set()
  server.shutdown()
  server.server_close()
  service.stop()


def test_full_queue_answers_503_with_retry_after(held_back_server, examples,
                                                 expected):
  url, service, started, release = held_back_server
  png = read(examples[0])
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    decoding = pool.submit(post_image, url, png)
    assert started.wait(timeout=60)
    waiting = pool.submit(post_image, url, png)
    deadline = time.monotonic() + 30
    while service.batcher.queue_size < 1 and time.monotonic() < deadline:
      time.sleep(0.01)
    status, headers, answer = post_image(url, png)
    assert status == 503
    assert headers['Retry-After'] == '1'
    assert 'busy' in answer['error']
    release.set()
    for future in (decoding, waiting):
      status, _, answer = future.result()
      assert (status, answer['caption']) == (200, expected[1][0])


def test_url_fetch_is_off_by_default(held_back_server):
  url = held_back_server[0]
  status, _, answer = request(url, 'POST', '/v1/captions',
                              b'{"url": "http://127.0.0.1/"}',
                              {'Content-Type': 'application/json'})
  assert status == 403 and '--allow_url_fetch' in answer['error']


class _Files(http.server.BaseHTTPRequestHandler):
  """A loopback web server: /image, /big, /slow and /redirect?to=URL."""
  image = b''

  def do_GET(self):  # pylint: disable=invalid-name
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
  fetch = functools.partial(fetch_lib.fetch_url, max_bytes=1000,
                            timeout_s=1.0, refuse=_loopback_only)
  image = read(examples[0])
  assert len(image) < 1000
  assert fetch(f'{files_url}/redirect?to=/image') == image
  for target in ('http://169.254.169.254/latest/meta-data/',
                 'http://10.0.0.1/'):
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


# --- The page in a browser ----------------------------------------------------

_CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'


def test_page_captions_an_upload_in_chromium(server, examples, expected):
  playwright_api = pytest.importorskip(
      'playwright.sync_api',
      reason='the page test needs `pip install playwright`')
  if not os.path.exists(_CHROMIUM):
    pytest.skip('the page test needs Chromium (apt-get install chromium)')
  url, _ = server
  with playwright_api.sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=_CHROMIUM,
        args=['--no-sandbox', '--disable-gpu', '--disable-quic',
              '--no-first-run', '--disable-background-networking',
              '--disable-component-update', '--disable-sync'])
    try:
      page = browser.new_page()
      requested, errors = [], []
      page.on('request', lambda r: requested.append(r.url))
      page.on('console', lambda m: m.type == 'error' and errors.append(m.text))
      page.on('pageerror', lambda e: errors.append(str(e)))
      page.goto(url + '/')
      page.set_input_files('#image', examples[1])
      page.click('#submit')
      # A selector wait, not wait_for_function: polling a JavaScript string
      # needs eval, which the page's Content-Security-Policy forbids.
      page.wait_for_selector('#panels canvas', state='attached',
                             timeout=30_000)
      caption = page.inner_text('#caption')
      panels = page.locator('#panels figcaption').all_inner_texts()
      # A shape's panel is brighter somewhere than everywhere else.
      spread = page.evaluate("""() => {
        const canvas = document.querySelectorAll('#panels canvas')[1];
        const d = canvas.getContext('2d').getImageData(
            0, 0, canvas.width, canvas.height).data;
        let low = 255, high = 0;
        for (let i = 0; i < d.length; i += 4) {
          const v = d[i] + d[i + 1] + d[i + 2];
          low = Math.min(low, v); high = Math.max(high, v);
        }
        return high - low;
      }""")
    finally:
      browser.close()
  assert caption == expected[1][1]
  assert panels == ['image'] + caption.split()
  assert spread > 0
  assert not errors
  assert all(r.startswith(url) for r in requested), requested
