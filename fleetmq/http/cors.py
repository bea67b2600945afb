"""CORS (contract sections 9 and 11): the origins given with ``--cors-origin`` may call the REST
API and the watch stream from a browser; no origin may by default.

A preflight is the one request under ``/api/v1`` answered without a token (a browser never
sends credentials with it); an allowed origin is echoed, never ``*``, since requests carry
``Authorization``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from fleetmq.core.models import quote
from fleetmq.errors import ConfigError
from fleetmq.http.params import error_response

ALLOW_METHODS = "GET, POST, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
EXPOSE_HEADERS = "Retry-After, WWW-Authenticate"
MAX_AGE_S = 600
"""How long a browser may keep a preflight's answer."""


def check_origin(origin: str) -> str:
    """An origin as browsers send it (``scheme://host[:port]``), or a ConfigError."""
    parts = urlsplit(origin)
    if (parts.scheme not in ("http", "https") or not parts.netloc or parts.path
            or parts.query or parts.fragment or "@" in parts.netloc):
        raise ConfigError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] "
                          "as the browser's address bar shows it, e.g. https://dash.example.com")
    return origin


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self._origins = frozenset(check_origin(origin) for origin in origins)

    def preflight(self, request: web.Request) -> web.Response | None:
        """The answer to a preflight request, None for any other request."""
        headers = request.headers
        origin = headers.get("Origin")
        if (request.method != "OPTIONS" or origin is None
                or "Access-Control-Request-Method" not in headers):
            return None
        if origin not in self._origins:
            return error_response(403, "Forbidden",
                                  f"Origin {quote(origin)} may not call this API from a "
                                  "browser; start fleetmq with --cors-origin for it")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_S),
            "Vary": "Origin",
        })

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer to an allowed origin says so (``on_response_prepare``: streams too)."""
        headers = response.headers
        origin = request.headers.get("Origin")
        if origin is not None and origin in self._origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        # Whatever the origin (or none): a cache must not serve one origin's answer to another.
        vary = headers.get("Vary")
        if vary is None:
            headers["Vary"] = "Origin"
        elif "origin" not in vary.lower():
            headers["Vary"] = f"{vary}, Origin"
