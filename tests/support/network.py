"""Loopback ports for test servers."""

from __future__ import annotations

import itertools
import os
import socket

# Below Linux's ephemeral range (32768-60999 by default), so no outgoing connection (a client's
# own port) takes a port between free_port() returning it and the server binding it. Each
# pytest-xdist worker (PYTEST_XDIST_WORKER=gw0, gw1, ...) draws from a block of its own, so two
# workers never hand out the same port either.
_FIRST, _BLOCK, _BLOCKS = 20000, 1000, 12


def _candidates() -> itertools.cycle[int] | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else _BLOCKS
    if index >= _BLOCKS:
        return None
    first = _FIRST + index * _BLOCK
    return itertools.cycle(range(first, first + _BLOCK))


_PORTS = _candidates()


def free_port() -> int:
    """Return a loopback TCP port nobody listens on right now (one of this worker's block)."""
    for _ in range(_BLOCK if _PORTS is not None else 0):
        port = next(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
