"""The HTTP listener of the REST facade: binds (HTTPS when given a certificate), reports the
port it really bound, and on shutdown lets requests in flight finish before it closes.

The socket is bound with ``SO_REUSEPORT``: within one process, the service stopping after a
step-down, the placeholder that answers meanwhile (``fleetmq.http.waiting``) and the service
starting again as a standby share the port, so it never goes unanswered. Another process is
still refused: ``check_port_free`` runs before the first bind."""

from __future__ import annotations

import logging
from typing import Protocol

from aiohttp import web

from fleetmq.config import HttpSettings
from fleetmq.errors import ConfigError
from fleetmq.http.direct import RequestHandler
from fleetmq.ports import address_in_use
from fleetmq.tls import HTTP_OPTIONS, server_context

log = logging.getLogger(__name__)


class Served(Protocol):
    """What the listener serves: the REST facade (``RestApi``) or the placeholder."""

    def build(self) -> web.Application: ...

    def direct(self, app: web.Application, app_handler: RequestHandler) -> RequestHandler: ...

    async def wait_idle(self, timeout_s: float) -> bool: ...


class HttpServer:
    """Serves the REST facade; reports the port it really bound (ask for 0 in tests)."""

    def __init__(self, api: Served, settings: HttpSettings) -> None:
        self._api = api
        self._settings = settings
        self._runner: web.AppRunner | None = None
        self.port = settings.port
        # Read at construction, so a wrong certificate path stops the start before anything
        # else opens.
        self._ssl = (server_context(settings.tls_cert, settings.tls_key, HTTP_OPTIONS)
                     if settings.tls_cert is not None and settings.tls_key is not None else None)

    def check_port_free(self) -> None:
        """Refuse a taken port at once, before the embedded broker or the MQTT link start
        (amqtt can hang stopping a client caught mid-connect)."""
        host, port = self._settings.host, self._settings.port
        if address_in_use(host, port):
            raise ConfigError(f"cannot serve HTTP on {host}:{port}: the port is already in use; "
                              "pass --http HOST:PORT with a free port")

    async def __aenter__(self) -> HttpServer:
        app = self._api.build()
        runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=self._settings.idle_timeout_s,
            shutdown_timeout=self._settings.shutdown_timeout_s,
            handle_signals=False,
        )
        await runner.setup()
        server = runner.server
        assert server is not None  # made by setup
        # Each connection takes the handler when it opens: set before the site starts.
        server.request_handler = self._api.direct(app, server.request_handler)
        site = web.TCPSite(runner, self._settings.host, self._settings.port,
                           ssl_context=self._ssl, reuse_port=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot serve HTTP on {self._settings.host}:{self._settings.port}: "
                f"{exc.strerror}; pass --http HOST:PORT with a free port"
            ) from exc
        self._runner = runner
        addresses = runner.addresses
        if addresses:
            self.port = addresses[0][1]
        log.info("http_listening address=%s:%d tls=%s", self._settings.host, self.port,
                 self._ssl is not None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        # Stop taking connections, then let requests in flight finish (a body may still be
        # arriving: aiohttp's own cleanup would drop it), then close what is left.
        for site in list(runner.sites):
            await site.stop()
        if not await self._api.wait_idle(self._settings.shutdown_timeout_s):
            log.warning("http_requests_unfinished timeout_s=%g",
                        self._settings.shutdown_timeout_s)
        await runner.cleanup()
