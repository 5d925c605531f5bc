"""`casern inspect`: the inspector on uvicorn, guarded for where it listens."""

from __future__ import annotations

import contextlib
import socket
import sys

import uvicorn

from .._app import Casern
from ._security import is_loopback
from ._web import build

__all__ = ["check_bind", "listen", "serve"]


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve every state to the network without a token."""
    if token is not None and not token.strip():
        raise ValueError("--token is empty; give a long random string")
    if token is None and not is_loopback(host):
        raise ValueError(
            f"--host {host} is reachable from other machines: add --token T (or set"
            " CASERN_INSPECT_TOKEN) so that only people with the token can look in"
        )


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the banner: a port in use is an OSError saying so."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(app: Casern, host: str, port: int, token: str | None, *, verbose: int = 0) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both)."""
    check_bind(host, token)
    # Without a token, answer only to loopback Host names: a page on another site
    # cannot read the states through DNS rebinding.
    web = build(app, token, loopback_only=token is None)
    sock = listen(host, port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"casern inspector for {app.store.url} on http://{shown}:{port}/"
        f"{' (token required)' if token else ''}; Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        web,
        host=host,
        port=port,
        log_level="info" if verbose else "warning",
        access_log=verbose > 1,
        server_header=False,
    )
    server = uvicorn.Server(config)
    with sock, contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C is a clean stop
        server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(3)  # uvicorn logged why (its exit status for a failed startup)
