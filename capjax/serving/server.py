"""Running the app in uvicorn, with connection limits and a graceful stop.

SIGTERM or SIGINT (also when a shell started the server in the background,
where SIGINT is ignored by default) stops the server gracefully: it closes
idle connections, gives requests being read or waiting for the decoder
`shutdown_timeout_s` less a second to finish and refuses the rest with 503.
Meanwhile it still accepts connections, and answers them 503 with
Retry-After: a client that connects during the drain gets an answer, not a
reset. Then it stops listening and returns, so that the program exits 0.
A second SIGINT stops it at once.
"""

import asyncio
from collections.abc import Callable, Iterator
import contextlib
import signal
import socket
import threading

from starlette import applications
import uvicorn

from capjax.serving import app as app_lib
from capjax.serving import limits as limits_lib
from capjax.serving import protocol

# Seconds of the graceful stop kept for writing the last answers.
_ANSWER_MARGIN_S = 1.0


def bind(host: str, port: int) -> socket.socket:
  """A socket bound to host:port (0: any free port), not yet listening.

  Raises:
    OSError: the address cannot be bound.
  """
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip('[]'), port))
  except OSError:
    sock.close()
    raise
  return sock


class _Server(uvicorn.Server):
  """uvicorn's server, whose signals start the app's drain and exit 0."""

  def __init__(
    self,
    config: uvicorn.Config,
    on_signal: Callable[[], None],
    drain_s: float,
  ):
    super().__init__(config)
    self._on_signal = on_signal
    self._drain_s = drain_s
    self._loop: asyncio.AbstractEventLoop | None = None
    self._drain_until: float | None = None

  async def serve(self, sockets=None) -> None:
    self._loop = asyncio.get_running_loop()
    await super().serve(sockets)

  @contextlib.contextmanager
  def capture_signals(self) -> Iterator[None]:
    # uvicorn's own re-raises the signal once stopped, so that the process
    # dies of it (exit status 143 for SIGTERM); a graceful stop is a success.
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    previous = {
      s: signal.signal(s, self.handle_exit)
      for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
      yield
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)

  def handle_exit(self, sig, frame) -> None:
    if not self.should_exit and self._loop is not None:
      self._loop.call_soon_threadsafe(self._begin_drain)
    super().handle_exit(sig, frame)

  def _begin_drain(self) -> None:
    # Called by the loop that `serve` set.
    assert self._loop is not None
    self._drain_until = self._loop.time() + self._drain_s
    self._on_signal()

  async def shutdown(self, sockets=None) -> None:
    # uvicorn stops listening at once, and the kernel resets the connections
    # still waiting to be accepted. Instead, listen while requests finish:
    # new connections are answered 503 (the protocol's `shared.draining`).
    if self._drain_until is not None:
      assert self._loop is not None  # set with _drain_until, by _begin_drain
      for connection in list(self.server_state.connections):
        connection.shutdown()  # idle ones close; busy ones after the answer
      while (
        self.server_state.tasks
        and not self.force_exit
        and self._loop.time() < self._drain_until
      ):
        await asyncio.sleep(0.05)
    await super().shutdown(sockets)


def make_server(
  app: applications.Starlette,
  limits: limits_lib.Limits,
  *,
  shutdown_timeout_s: float,
) -> uvicorn.Server:
  """A uvicorn server of the app; `server.run(sockets=[sock])` serves.

  Args:
    app: the app (`app_lib.create_app`).
    limits: connection limits.
    shutdown_timeout_s: the time a graceful stop may take.
  """
  http = protocol.protocol_class(limits, app.state.service.metrics)
  config = uvicorn.Config(
    app,
    http=http,
    ws='none',
    lifespan='on',
    log_config=None,
    access_log=False,
    server_header=False,
    # uvicorn types its timeouts as int; it takes any number of seconds.
    timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
    # The drain has had all but this time (see _Server.shutdown).
    timeout_graceful_shutdown=_ANSWER_MARGIN_S,  # type: ignore[arg-type]
    backlog=max(128, limits.max_connections),
  )
  drain_s = max(shutdown_timeout_s - _ANSWER_MARGIN_S, 0.0)

  def on_signal() -> None:
    http.shared.draining = True  # new connections are answered 503
    app_lib.begin_shutdown(app, drain_s)

  return _Server(config, on_signal, drain_s)


def serve(
  app: applications.Starlette,
  sock: socket.socket,
  limits: limits_lib.Limits,
  *,
  shutdown_timeout_s: float,
) -> None:
  """Serves the app on a socket from `bind` until SIGTERM or SIGINT."""
  make_server(app, limits, shutdown_timeout_s=shutdown_timeout_s).run(
    sockets=[sock]
  )
