"""One question asked of the operating system before binding: is this address taken?

Asked up front so that a taken port is one clear sentence, not a traceback from deep inside
aiohttp or amqtt after half the service has started.
"""

from __future__ import annotations

import errno
import socket


def address_in_use(host: str, port: int) -> bool:
    """True if ``host:port`` is already bound by someone; any other bind error (an unknown
    host, say) answers False and is left for ``bind_error`` or the real bind to report."""
    error = bind_error(host, port)
    return error is not None and error.errno == errno.EADDRINUSE


def bind_error(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be bound now (taken, an address of another machine, a name
    that does not resolve), or None."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None
