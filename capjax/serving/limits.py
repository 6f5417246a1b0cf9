"""What one client may take of the server: connections, bytes, counts, time."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
  """Connection limits.

  Attributes:
    max_connections: the most open connections.
    max_connections_per_client: the most open connections of one address.
    header_timeout_s: the time a request's headers may take, counted from
      the connection's start or the previous answer.
    keep_alive_s: how long an idle connection is kept open.
    max_requests_per_connection: requests before the connection is closed.
    max_header_bytes: the most bytes of request line and headers, and of
      trailers.
    max_headers: the most header fields, and trailer fields.
    max_body_bytes: the largest body the app takes; with
      max_framing_bytes, bounds a body's bytes on the wire.
    max_framing_bytes: the most bytes of a body's chunk framing (sizes,
      extensions, trailers) beyond its data.
    max_chunks: the most chunks of a chunked body.
    max_pipelined: the most requests read ahead of the one being answered.
  """

  max_connections: int = 128
  max_connections_per_client: int = 32
  header_timeout_s: float = 10.0
  keep_alive_s: float = 5.0
  max_requests_per_connection: int = 1000
  max_header_bytes: int = 32 * 1024
  max_headers: int = 100
  max_body_bytes: int = 10 * 2**20
  max_framing_bytes: int = 2**20
  max_chunks: int = 10_000
  max_pipelined: int = 16
