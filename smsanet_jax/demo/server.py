"""Where the demo listens: the socket is bound here first, so a busy port is a clear error, then uvicorn serves it."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket

import uvicorn

from smsanet_jax.demo import app as app_lib
from smsanet_jax.demo import engine as engine_lib

# Host names a browser on this machine uses for a loopback server (the Host header it sends).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Connections served at once; more are answered 503 by uvicorn (the engine queues the model itself).
MAX_CONNECTIONS = 32


@dataclasses.dataclass(frozen=True)
class Listener:
    """A bound, listening socket and how to reach it.

    Attributes:
      socket: the listening socket (uvicorn serves it).
      host: the host part of the page's address, as a browser sends it in the Host header.
      port: the port bound.
      loopback: only this machine can connect (anything else means anyone who can reach the
        address can use the page: it has no authentication).
    """

    socket: socket.socket
    host: str
    port: int
    loopback: bool

    @property
    def url(self) -> str:
        """The page's address."""
        return f"http://{self.host}:{self.port}/"

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc_info) -> None:
        self.socket.close()


def listen(host: str, port: int) -> Listener:
    """Binds `host:port` (port 0: any free port); use it in a `with` block, which closes the socket.

    Raises:
      ValueError: a port out of range or in use, or a host that is not an address of this machine.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not a known host name or address ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.listen()
    except OSError as e:
        sock.close()
        raise ValueError(_bind_error(host, port, e)) from None
    bound_ip, bound_port = sock.getsockname()[:2]
    ip = ipaddress.ip_address(bound_ip)
    if ip.is_unspecified:  # 0.0.0.0 or ::: others reach it by the machine's name.
        url_host = socket.gethostname()
    else:
        url_host = f"[{bound_ip}]" if ip.version == 6 else bound_ip
    return Listener(sock, url_host, bound_port, ip.is_loopback)


def _bind_error(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"--port {port}: already in use on {host}; stop what uses it or choose another --port"
    if error.errno == errno.EACCES:
        return f"--port {port}: not allowed (ports below 1024 need root); choose another --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine"
    return f"--host {host} --port {port}: cannot listen ({error.strerror})"


def serve(engine: engine_lib.DemoEngine, listener: Listener) -> None:
    """Serves the demo on `listener` until interrupted (Ctrl-C or SIGTERM)."""
    allowed = (*LOOPBACK_NAMES, listener.host) if listener.loopback else None
    config = uvicorn.Config(
        app_lib.create_app(engine, allowed_hosts=allowed),
        log_level="warning",
        access_log=False,
        limit_concurrency=MAX_CONNECTIONS,
    )
    uvicorn.Server(config).run(sockets=[listener.socket])
