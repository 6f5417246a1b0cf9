"""Fetching an image by URL, from public addresses only.

Only http and https URLs of public addresses are fetched: private, loopback,
link-local, multicast and reserved addresses are refused after DNS resolution
and again on every redirect, and the connection goes to the address that was
checked; a body limit and a time limit (for the whole fetch, not each
read) bound the download.
"""

from collections.abc import Callable
import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse

from capjax.serving import requests

_MAX_REDIRECTS = 3

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Most specific first, so that 127.0.0.1 is named loopback, not private.
_REFUSED_KINDS = (
  'loopback',
  'link_local',
  'multicast',
  'unspecified',
  'reserved',
  'private',
)


def refused_reason(address: Address) -> str | None:
  """Why an address must not be fetched from; None for a public address."""
  if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
    address = address.ipv4_mapped
  for kind in _REFUSED_KINDS:
    if getattr(address, f'is_{kind}'):
      return kind.replace('_', '-')
  return None if address.is_global else 'non-global'


def _checked_address(
  host: str, port: int, refuse: Callable[[Address], str | None]
) -> Address:
  """The address to connect to, once all the host resolves to are checked."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except (OSError, UnicodeError) as e:
    raise requests.RequestError(400, f'cannot resolve {host!r}: {e}') from None
  addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
  for address in addresses:
    reason = refuse(address)
    if reason:
      raise requests.RequestError(
        403,
        f'refusing to fetch from {host}: it resolves '
        f'to {address}, a {reason} address',
      )
  return addresses[0]


def _connect(
  scheme: str, host: str, port: int, address: Address, timeout_s: float
) -> http.client.HTTPConnection:
  """A connection to `address` (already checked) that speaks to `host`.

  Connecting to the checked address, not the name, leaves no second DNS
  answer to slip a refused address in.
  """
  sock = socket.create_connection((str(address), port), timeout=timeout_s)
  if scheme == 'https':
    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    connection: http.client.HTTPConnection = http.client.HTTPSConnection(
      host, port, timeout=timeout_s
    )
  else:
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
  connection.sock = sock
  return connection


def fetch_url(
  url: str,
  *,
  max_bytes: int,
  timeout_s: float,
  refuse: Callable[[Address], str | None] = refused_reason,
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
  cutter = _Cutter(deadline)
  try:
    for _ in range(_MAX_REDIRECTS + 1):
      parts, hostname, port = _parse(url)
      address = _checked_address(hostname, port, refuse)
      connection = _connect(
        parts.scheme,
        hostname,
        port,
        address,
        max(deadline - time.monotonic(), 0.001),
      )
      cutter.watch(connection.sock)
      try:
        connection.request(
          'GET',
          urllib.parse.urlunsplit(('', '', parts.path or '/', parts.query, '')),
          headers={'Accept': 'image/*'},
        )
        response = connection.getresponse()
        location = response.getheader('Location')
        if response.status in (301, 302, 303, 307, 308) and location:
          try:
            url = urllib.parse.urljoin(url, location)
          except ValueError as e:
            raise requests.RequestError(
              502, f'{hostname} redirected to a bad URL: {e}'
            ) from None
          continue
        if response.status != 200:
          raise requests.RequestError(
            502,
            f'{hostname} answered {response.status} {response.reason}',
          )
        return _read_limited(response, max_bytes, deadline)
      finally:
        connection.close()
    raise requests.RequestError(502, f'more than {_MAX_REDIRECTS} redirects')
  except (OSError, http.client.HTTPException) as e:
    if cutter.cut or isinstance(e, TimeoutError):
      raise requests.RequestError(
        504, f'fetching {url[:200]} took over {timeout_s} s'
      ) from None
    raise requests.RequestError(502, f'cannot fetch {url[:200]}: {e}') from None
  finally:
    cutter.cancel()


def _parse(url: str) -> tuple[urllib.parse.SplitResult, str, int]:
  """A URL's parts, host name and port; 400 for one that is not http(s)."""
  try:
    parts = urllib.parse.urlsplit(url)
    hostname, port = parts.hostname, parts.port
  # A bad port, or a bracketed host that is not an IPv6 address.
  except ValueError as e:
    raise requests.RequestError(400, f'bad URL {url[:200]!r}: {e}') from None
  if parts.scheme not in ('http', 'https') or not hostname:
    raise requests.RequestError(
      400, f'only http and https URLs are fetched, got {url[:200]!r}'
    )
  return parts, hostname, port or (443 if parts.scheme == 'https' else 80)


class _Cutter:
  """Shuts the fetch's socket down at the deadline.

  A socket's timeout bounds each read, not the whole fetch: a server that
  sends a header byte just before each timeout would hold it for ever.
  """

  def __init__(self, deadline: float):
    self._deadline = deadline
    self._timer: threading.Timer | None = None
    self.cut = False

  def watch(self, sock: socket.socket) -> None:
    self.cancel()
    self._timer = threading.Timer(
      max(self._deadline - time.monotonic(), 0.0), self._cut, (sock,)
    )
    self._timer.daemon = True
    self._timer.start()

  def _cut(self, sock: socket.socket) -> None:
    self.cut = True
    with contextlib.suppress(OSError):
      sock.shutdown(socket.SHUT_RDWR)

  def cancel(self) -> None:
    if self._timer is not None:
      self._timer.cancel()


def _read_limited(
  response: http.client.HTTPResponse, max_bytes: int, deadline: float
) -> bytes:
  """The response body, refused once over max_bytes or past the deadline."""
  too_large = requests.RequestError(
    413, f'the image at the URL is over the limit of {max_bytes:,} bytes'
  )
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
