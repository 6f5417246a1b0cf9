"""The server's metrics, in the Prometheus text format (GET /metrics).

Each app has its own registry, so that several apps in one process (tests,
an app mounted in another) count apart. XLA compilations are counted for
the whole process: after warm-up there should be none, whatever requests
arrive.
"""

from collections.abc import Callable
import threading

import jax
import prometheus_client as prom

CONTENT_TYPE = prom.CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1.0,
  2.5,
  5.0,
  10.0,
  30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PHASES = ('body', 'image', 'queue', 'decode', 'answer')

_compiles = 0
_compiles_lock = threading.Lock()
_listening = False


def _count_compile(event: str, duration_s: float, **kwargs) -> None:
  del duration_s, kwargs
  global _compiles
  if event == '/jax/core/compile/backend_compile_duration':
    with _compiles_lock:
      _compiles += 1


def compiles() -> int:
  """XLA compilations in this process since the first `Metrics` was made."""
  return _compiles


class Metrics:
  """Counters, gauges and histograms of one app."""

  def __init__(self):
    global _listening
    with _compiles_lock:
      if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_count_compile)
        _listening = True
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter(
      'capjax_http_requests',
      'HTTP requests answered, by route and status.',
      ['route', 'status'],
      registry=r,
    )
    self.latency = prom.Histogram(
      'capjax_http_request_duration_seconds',
      "Time from the request headers to the answer's last byte, by route.",
      ['route'],
      buckets=_LATENCY_BUCKETS_S,
      registry=r,
    )
    phase = prom.Histogram(
      'capjax_request_phase_seconds',
      'Where a caption request spends its '
      'time: reading the body, decoding and resizing the image (waiting '
      'for a thread included), waiting for the decoder, decoding, and '
      'making the answer.',
      ['phase'],
      buckets=_LATENCY_BUCKETS_S,
      registry=r,
    )
    self.phase = {name: phase.labels(name) for name in PHASES}
    self.batch_size = prom.Histogram(
      'capjax_decoder_batch_size',
      'Images handed to the decoder at once '
      '(rows admitted together, or a beam search batch).',
      buckets=_BATCH_BUCKETS,
      registry=r,
    )
    self.rows_per_step = prom.Histogram(
      'capjax_decoder_rows_per_step',
      'Captions advanced together by a '
      'call of the greedy decoder (one or more steps).',
      buckets=_BATCH_BUCKETS,
      registry=r,
    )
    self.steps = prom.Counter(
      'capjax_decoder_calls', 'Calls of the greedy decoder.', registry=r
    )
    self.decoded = prom.Counter(
      'capjax_decoded_images', 'Images captioned.', registry=r
    )
    self.refused = prom.Counter(
      'capjax_connections_refused',
      'Connections refused or closed early, by reason.',
      ['reason'],
      registry=r,
    )
    self.queue_length = prom.Gauge(
      'capjax_decoder_queue_length',
      'Requests waiting for the decoder.',
      registry=r,
    )
    self.images_waiting = prom.Gauge(
      'capjax_images_waiting',
      'Images waiting for or being decoded.',
      registry=r,
    )
    self.ready = prom.Gauge(
      'capjax_ready',
      '1 once warm-up has compiled '
      'everything, 0 before and while shutting down.',
      registry=r,
    )
    prom.Gauge(
      'capjax_xla_compiles', 'XLA compilations in this process.', registry=r
    ).set_function(compiles)

  def watch(
    self,
    queue_length: Callable[[], int],
    images_waiting: Callable[[], int],
    ready: Callable[[], bool],
  ) -> None:
    """Reads these gauges from the service when scraped."""
    self.queue_length.set_function(queue_length)
    self.images_waiting.set_function(images_waiting)
    self.ready.set_function(lambda: float(ready()))

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)
