"""The web dashboard (contract section 9): static files from the package, served at ``/`` and
``/dashboard/<file>``, open without a token since they hold no fleet data (the page asks for a
key and sends it with its own API calls)."""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

from fleetmq.http.params import error_response

INDEX_PATH = "/"
FILES_PATH = "/dashboard/{name}"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _File:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


class Dashboard:
    """The files, read once from the package when the app is built."""

    def __init__(self) -> None:
        folder = resources.files("fleetmq") / "dashboard"
        self._files: dict[str, _File] = {}
        for entry in folder.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if entry.is_file() and suffix in _TYPES:
                self._files[entry.name] = _File(entry.read_bytes(), _TYPES[suffix])

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(INDEX_PATH, self.index)
        router.add_get(FILES_PATH, self.file)

    async def index(self, request: web.Request) -> web.Response:
        return self._answer(request, "index.html")

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "index.html" or name not in self._files:
            return error_response(404, "Not found", "No such dashboard file")
        return self._answer(request, name)

    def _answer(self, request: web.Request, name: str) -> web.Response:
        found = self._files[name]
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": found.etag}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = found.content_type
        return web.Response(body=found.body, headers=headers)
