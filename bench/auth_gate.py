"""What the REST bearer-token gate costs: ``RestAccess.check`` per request, in microseconds.

In-process, no sockets: an ``AuthService`` on the memory store with ``--keys`` API keys and
``--nodes`` node credentials, and aiohttp's own request factory. Each figure is the median of
five runs of ``--requests`` checks:

- a valid key on the heartbeat route (SHA-256, two dict lookups, the role rule);
- a valid node token on its own node's GET;
- an unknown token (the back-off's bookkeeping included);
- auth off (the one dict lookup every request pays).

    python bench/auth_gate.py --requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetmq.auth.limits import LoginBackoff
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import MemoryAuthStore
from fleetmq.config import AuthSettings
from fleetmq.core.clock import SystemClock
from fleetmq.http.auth import RestAccess


async def _noop(_request: web.Request) -> web.Response:
    return web.Response()


def _app() -> web.Application:
    app = web.Application()
    app.router.add_post("/api/v1/fleet/heartbeat", _noop)
    app.router.add_get("/api/v1/fleet/nodes/{node_id}", _noop)
    return app


async def _setup(keys: int, nodes: int) -> tuple[RestAccess, str, str]:
    auth = AuthService(MemoryAuthStore(), SystemClock())
    await auth.load()
    token = ""
    for i in range(keys):
        _, token = await auth.create_key("write", name=f"k{i}", actor="bench")
    node_token = ""
    for i in range(nodes):
        _, node_token = await auth.issue_credential(f"node-{i}", actor="bench")
    # A huge back-off table so that unknown-token runs never reach 429 (limit not hit).
    access = RestAccess(auth, AuthSettings(), time.monotonic, Counter(),
                        LoginBackoff(limit=10**9))
    return access, token, node_token


async def _request(app: web.Application, method: str, path: str,
                   token: str | None) -> web.Request:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = make_mocked_request(method, path, headers=headers, app=app)
    match = await app.router.resolve(request)
    request._match_info = match
    return request


def _time(access: RestAccess, request: web.Request, n: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            access.check(request)
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=10_000)
    args = parser.parse_args()
    access, key, node_token = await _setup(args.keys, args.nodes)
    app = _app()
    access.bind(app)
    heartbeat = await _request(app, "POST", "/api/v1/fleet/heartbeat", key)
    own = await _request(app, "GET", f"/api/v1/fleet/nodes/node-{args.nodes - 1}", node_token)
    unknown = await _request(app, "POST", "/api/v1/fleet/heartbeat", "fmq_key_" + "A" * 43)
    access.enabled = True
    rows = [("valid key, heartbeat", _time(access, heartbeat, args.requests)),
            ("node token, own node", _time(access, own, args.requests)),
            ("unknown token (401)", _time(access, unknown, args.requests))]
    access.enabled = False
    rows.append(("auth off", _time(access, heartbeat, args.requests)))
    print(f"RestAccess.check, {args.keys} keys, {args.nodes} node credentials, "
          f"median of 5 x {args.requests}:")
    for name, micros in rows:
        print(f"  {name:<24} {micros:6.2f} us/request")


if __name__ == "__main__":
    asyncio.run(main())
