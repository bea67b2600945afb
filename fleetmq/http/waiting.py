"""What a manager serves between a step-down and its start again as a standby (contract
section 10): ``/healthz`` 200, ``/readyz`` 503 ``{"status": "standby"}`` and every ``/api/``
route 503 ``Standby``, while the store may still be out of reach. It shares the manager's
port (``SO_REUSEPORT``) with the service stopping and with the one starting, so the port never
goes unanswered."""

from __future__ import annotations

from aiohttp import web

from fleetmq.http.api import STANDBY_MESSAGE
from fleetmq.http.direct import RequestHandler
from fleetmq.http.params import json_response


class WaitingApi:
    def __init__(self) -> None:
        self.reason = "starting again as a standby"

    def build(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_route("*", "/api/{tail:.*}", self.standby)
        return app

    def direct(self, _app: web.Application, handler: RequestHandler) -> RequestHandler:
        return handler

    async def wait_idle(self, _timeout_s: float) -> bool:
        return True  # every answer is immediate

    async def healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "standby", "active": None, "message": self.reason},
                             503)

    async def standby(self, _request: web.Request) -> web.Response:
        return json_response({"error": "Standby", "message": STANDBY_MESSAGE, "active": None},
                             503)
