r"""Load test of `capjax.serve`: batched against one-at-a-time serving.

  python scripts/load_test.py --workdir /tmp/capjax-demo

Starts `python -m capjax.serve --workdir ...` on 127.0.0.1 twice, one after
the other so that they never share the CPU: batching up to 32 captions
(--max_batch_size 32) and one caption at a time (--max_batch_size 1).
Client threads post the workdir's held-out example images (or --images),
each over its own keep-alive connection: 1, 8 and 32 clients against the
batched server, 32 against the one-at-a-time one. Each run sends at most
--requests requests in at most --seconds seconds, after an untimed round
of one request per client. Prints requests/s and p50/p99 latency per run,
where the server says a request's time went (its /metrics: reading the
body, decoding the image, waiting for the decoder, decoding, the answer)
and the server's memory, the throughput ratio of batched to one-at-a-time
serving at 32 clients, and all of it as one JSON line.

With --mixed, requests vary as a page and scripts would send them: beam
search, attention, shorter captions, and one in ten an unreadable image
(answered 415, counted as errors).

Servers that already run can be measured instead, on loopback addresses
only (this is a load generator; it refuses any other host):

  python scripts/load_test.py --images a.jpg b.jpg \
      --url http://127.0.0.1:8081 --baseline_url http://127.0.0.1:8082
"""

import collections
from collections.abc import Sequence
import contextlib
import http.client
import ipaddress
import itertools
import json
import os
import pathlib
import re
import socket
import tempfile
import threading
import time
from typing import TypedDict
import urllib.parse

from absl import app
from absl import flags
import numpy as np

from capjax.testing import serving

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'A trained workdir: start its servers here.'
)
_URL = flags.DEFINE_string(
  'url', None, 'A running batched server (loopback), instead of --workdir.'
)
_BASELINE_URL = flags.DEFINE_string(
  'baseline_url', None, 'A running one-at-a-time server (loopback).'
)
_IMAGES = flags.DEFINE_list(
  'images', [], "Images to send; default: the workdir's examples/."
)
_CONCURRENCY = flags.DEFINE_list(
  'concurrency',
  ['1', '8', '32'],
  'Client counts against the batched '
  'server; the last one also runs against the one-at-a-time server.',
)
_BASELINE_CONCURRENCY = flags.DEFINE_list(
  'baseline_concurrency',
  [],
  'Client counts against the one-at-a-time or --baseline_url server; '
  'default: the last of --concurrency.',
)
_MAX_BATCH_SIZE = flags.DEFINE_integer(
  'max_batch_size', 32, 'The batched server started from --workdir.'
)
_REQUESTS = flags.DEFINE_integer(
  'requests', 2000, 'Most requests per run.', lower_bound=1, upper_bound=100_000
)
_SECONDS = flags.DEFINE_float(
  'seconds', 20.0, 'Most seconds per run.', lower_bound=0.1, upper_bound=600
)
_PID = flags.DEFINE_integer(
  'pid',
  None,
  "With --url: the server's process id, for its memory and CPU time.",
)
_BASELINE_PID = flags.DEFINE_integer(
  'baseline_pid', None, "With --baseline_url: that server's process id."
)
_MIXED = flags.DEFINE_boolean(
  'mixed',
  False,
  'Vary the requests: beam search, attention, max_len, '
  'and some unreadable images.',
)

# Queries of --mixed requests, in turn; None: an unreadable image.
_MIXED_QUERIES = (
  '',
  '?beam_size=3',
  '?attention=true',
  '?max_len=8',
  '',
  '?beam_size=2&max_len=20',
  '',
  '?attention=true&beam_size=3',
  '',
  None,
)
_PHASES = ('body', 'image', 'queue', 'decode', 'answer')


class Measurement(TypedDict):
  """One run's results (`measure`)."""

  concurrency: int
  requests: int
  errors: dict[str, int]
  seconds: float
  requests_per_s: float
  p50_ms: float
  p99_ms: float
  phases_ms: dict[str, float]
  server_rss_mb: float | None
  server_cpu_ms: float | None


def check_loopback(url: str) -> str:
  """The URL, if it is http on a loopback address.

  Raises:
    app.UsageError: any other URL.
  """
  parts = urllib.parse.urlsplit(url)
  if parts.scheme != 'http' or not parts.hostname:
    raise app.UsageError(f'{url}: an http:// URL is needed')
  try:
    addresses = {
      info[4][0]
      for info in socket.getaddrinfo(
        parts.hostname, parts.port or 80, type=socket.SOCK_STREAM
      )
    }
  except OSError as e:
    raise app.UsageError(f'{url}: {e}') from None
  if not all(ipaddress.ip_address(a).is_loopback for a in addresses):
    raise app.UsageError(
      f'{url} is not a loopback address: this load test '
      'only runs against servers on this machine'
    )
  return url


def _client(
  url: str,
  bodies: Sequence[bytes],
  tickets: itertools.count,
  max_requests: int,
  deadline: float,
  latencies: list[float],
  errors: collections.Counter[str | int],
) -> None:
  """Posts images over one connection until the requests or time run out."""
  parts = urllib.parse.urlsplit(url)
  # Loopback URLs (check_loopback) or the started servers': never None.
  host = parts.hostname
  assert host is not None
  connect = lambda: http.client.HTTPConnection(host, parts.port, timeout=120)
  connection = connect()
  # next() on an itertools.count is atomic, so tickets are never shared.
  while (ticket := next(tickets)) < max_requests and (
    time.monotonic() < deadline
  ):
    body, query = bodies[ticket % len(bodies)], ''
    if _MIXED.value:
      mixed = _MIXED_QUERIES[ticket % len(_MIXED_QUERIES)]
      body, query = (b'not an image', '') if mixed is None else (body, mixed)
    start = time.perf_counter()
    try:
      connection.request(
        'POST',
        f'/v1/captions{query}',
        body,
        {'Content-Type': 'application/octet-stream'},
      )
      response = connection.getresponse()
      response.read()
    except (OSError, http.client.HTTPException) as e:
      errors[type(e).__name__] += 1
      connection.close()
      connection = connect()
      continue
    if response.status == 200:
      latencies.append(time.perf_counter() - start)
    else:
      errors[response.status] += 1
    if response.will_close:
      connection.close()
      connection = connect()
  connection.close()


def _phase_totals(url: str) -> dict[str, tuple[float, float]]:
  """(seconds, count) per phase from the server's /metrics; {} if none."""
  parts = urllib.parse.urlsplit(url)
  # Loopback URLs (check_loopback) or the started servers': never None.
  assert parts.hostname is not None
  connection = http.client.HTTPConnection(
    parts.hostname, parts.port, timeout=30
  )
  try:
    connection.request('GET', '/metrics')
    text = connection.getresponse().read().decode()
  except (OSError, http.client.HTTPException):
    return {}
  finally:
    connection.close()
  totals: collections.defaultdict[str, list[float]] = collections.defaultdict(
    lambda: [0.0, 0.0]
  )
  for kind, phase, value in re.findall(
    r'^capjax_request_phase_seconds_(sum|count)\{phase="(\w+)"\} (\S+)$',
    text,
    re.MULTILINE,
  ):
    totals[phase][kind == 'count'] = float(value)
  return {phase: (v[0], v[1]) for phase, v in totals.items()}


def _rss_mb(pid: int | None) -> float | None:
  if pid is None:
    return None
  with open(f'/proc/{pid}/status', encoding='ascii') as status:
    for line in status:
      if line.startswith('VmRSS:'):
        return round(int(line.split()[1]) / 1024, 1)
  return None


def _cpu_s(pid: int | None) -> float | None:
  """CPU seconds (user and system) the process has used; None: unknown."""
  if pid is None:
    return None
  with open(f'/proc/{pid}/stat', encoding='ascii') as stat:
    # Fields after the parenthesised command name; utime and stime are the
    # 14th and 15th of the line.
    fields = stat.read().rpartition(')')[2].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def measure(
  url: str,
  bodies: Sequence[bytes],
  concurrency: int,
  max_requests: int,
  max_seconds: float,
  pid: int | None = None,
) -> Measurement:
  """Requests/s and latency of `concurrency` clients sending at once."""
  latencies: list[float] = []
  errors: collections.Counter[str | int] = collections.Counter()
  tickets = itertools.count()
  phases_before = _phase_totals(url)
  cpu_before = _cpu_s(pid)
  start = time.monotonic()
  threads = [
    threading.Thread(
      target=_client,
      args=(
        url,
        bodies,
        tickets,
        max_requests,
        start + max_seconds,
        latencies,
        errors,
      ),
    )
    for _ in range(concurrency)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  seconds = time.monotonic() - start
  latencies_ms = np.array(latencies or [np.nan]) * 1000
  phases_after = _phase_totals(url)
  cpu_after = _cpu_s(pid)
  # Mean milliseconds per request in each phase, by the server's clock.
  phases: dict[str, float] = {}
  for phase in _PHASES:
    (s0, n0), (s1, n1) = (
      p.get(phase, (0.0, 0.0)) for p in (phases_before, phases_after)
    )
    if n1 > n0:
      phases[phase] = round((s1 - s0) / (n1 - n0) * 1000, 2)
  return {
    'concurrency': concurrency,
    'requests': len(latencies),
    'errors': {str(k): v for k, v in errors.items()},
    'seconds': round(seconds, 2),
    'requests_per_s': round(len(latencies) / seconds, 1),
    'p50_ms': round(float(np.percentile(latencies_ms, 50)), 1),
    'p99_ms': round(float(np.percentile(latencies_ms, 99)), 1),
    'phases_ms': phases,
    'server_rss_mb': _rss_mb(pid),
    # The server's CPU time per answer: what a request costs it, little
    # changed by other work on the machine.
    'server_cpu_ms': None
    if cpu_before is None or cpu_after is None
    else round((cpu_after - cpu_before) * 1000 / max(len(latencies), 1), 2),
  }


def run(
  url: str,
  bodies: Sequence[bytes],
  concurrencies: Sequence[int],
  pid: int | None = None,
) -> list[Measurement]:
  """One measurement per client count, each after an untimed round."""
  results = []
  for concurrency in concurrencies:
    measure(url, bodies, concurrency, concurrency, _SECONDS.value)
    results.append(
      measure(url, bodies, concurrency, _REQUESTS.value, _SECONDS.value, pid)
    )
  return results


@contextlib.contextmanager
def started_server(workdir: str, max_batch_size: int, log_dir: str):
  """(URL, pid) of a capjax.serve process, for the length of the block."""
  process, url = serving.start_subprocess(
    ['--workdir', workdir, f'--max_batch_size={max_batch_size}'],
    str(pathlib.Path(log_dir) / f'serve-{max_batch_size}.log'),
  )
  try:
    yield url, process.pid
  finally:
    process.terminate()
    process.wait()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if bool(_WORKDIR.value) == bool(_URL.value and _BASELINE_URL.value):
    raise app.UsageError('give --workdir, or both --url and --baseline_url')
  paths: Sequence[str | pathlib.Path] = _IMAGES.value or (
    sorted(pathlib.Path(_WORKDIR.value, 'examples').glob('*'))
    if _WORKDIR.value
    else []
  )
  if not paths:
    raise app.UsageError('no images: give --images')
  bodies = [pathlib.Path(p).read_bytes() for p in paths]
  try:
    concurrencies = [int(c) for c in _CONCURRENCY.value]
    baseline_concurrencies = [
      int(c) for c in _BASELINE_CONCURRENCY.value
    ] or concurrencies[-1:]
  except ValueError:
    raise app.UsageError('--concurrency takes integers') from None
  if not concurrencies or not all(
    0 < c <= 256 for c in concurrencies + baseline_concurrencies
  ):
    raise app.UsageError('--concurrency takes 1 to 256 clients')

  if _WORKDIR.value:
    with tempfile.TemporaryDirectory() as log_dir:
      with started_server(_WORKDIR.value, _MAX_BATCH_SIZE.value, log_dir) as (
        url,
        pid,
      ):
        batched = run(url, bodies, concurrencies, pid)
      with started_server(_WORKDIR.value, 1, log_dir) as (url, pid):
        single = run(url, bodies, baseline_concurrencies, pid)
  else:
    # Both are given when --workdir is not (checked above).
    url, baseline_url = _URL.value, _BASELINE_URL.value
    assert url and baseline_url
    batched = run(check_loopback(url), bodies, concurrencies, _PID.value)
    single = run(
      check_loopback(baseline_url),
      bodies,
      baseline_concurrencies,
      _BASELINE_PID.value,
    )

  print(
    f'{"server":<15}{"clients":>8}{"requests":>10}{"errors":>8}'
    f'{"req/s":>9}{"p50 ms":>9}{"p99 ms":>9}{"RSS MB":>9}'
    f'{"CPU ms":>8}   server ms per request: {" ".join(_PHASES)}'
  )
  names = (
    ('batched', 'one at a time') if _WORKDIR.value else ('url', 'baseline')
  )
  for name, results in zip(names, (batched, single)):
    for r in results:
      phases = ' '.join(str(r['phases_ms'].get(p, '-')) for p in _PHASES)
      print(
        f'{name:<15}{r["concurrency"]:>8}{r["requests"]:>10}'
        f'{sum(r["errors"].values()):>8}{r["requests_per_s"]:>9}'
        f'{r["p50_ms"]:>9}{r["p99_ms"]:>9}'
        f'{str(r["server_rss_mb"] or "-"):>9}'
        f'{str(r["server_cpu_ms"] or "-"):>8}   {phases}'
      )
  ratio = batched[-1]['requests_per_s'] / max(
    single[-1]['requests_per_s'], 1e-9
  )
  print(
    f'throughput at {concurrencies[-1]} clients, batched / one at a '
    f'time: {ratio:.1f}x'
  )
  print(
    json.dumps(
      {'batched': batched, 'one_at_a_time': single, 'ratio': round(ratio, 2)}
    )
  )


if __name__ == '__main__':
  app.run(main)
