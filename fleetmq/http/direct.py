"""The two routes devices call at their own pace (POST register and heartbeat), handed to their
handler without aiohttp's router and middleware chain; every other request goes the usual way.

Per request aiohttp's ``Application._handle`` resolves the route (a coroutine), builds and
freezes a match info, and with any middleware at all wraps the handler in its own
``current_app`` middleware as well as ours: three coroutines and about 5 us before the
handler runs, 7% of a heartbeat (bench/README.md section 21). Here a request whose method and
raw path are exactly a direct route's goes straight to the API's guard (the middleware's own
body: in-flight count, token gate, JSON errors) with that route, so it is answered exactly as
through the router. It must not decide anything else: a path spelled any other way
(a query, percent-encoding), or an ``Expect`` header, takes aiohttp's way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import cast

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Guard = Callable[[web.Request, Handler, AbstractRoute], Awaitable[web.StreamResponse]]


def direct(app: web.Application, app_handler: RequestHandler, guard: Guard,
           paths: Iterable[str], middleware: object) -> RequestHandler:
    """``app_handler`` (the server's request handler for ``app``), except for POST to one of
    ``paths`` (plain routes of ``app``), which goes to ``guard`` with its route. Only while
    that is all aiohttp would do between the two: ``middleware`` is the app's one middleware,
    and no sub-application or response signal needs the router's match info; else
    ``app_handler`` as it is."""
    if list(app.middlewares) != [middleware] or app.on_response_prepare:
        return app_handler
    wanted = set(paths)
    routes: dict[str, tuple[Handler, AbstractRoute, UrlMappingMatchInfo]] = {}
    for route in app.router.routes():
        resource = route.resource
        if route.method != "POST" or resource is None or resource.canonical not in wanted:
            continue
        if not isinstance(resource, web.PlainResource):
            return app_handler
        # What the router would make for this route, made once: handlers may read
        # request.match_info and request.app as usual (nothing changes it once frozen).
        match = UrlMappingMatchInfo({}, route)
        match.add_app(app)
        match.freeze()
        routes[resource.canonical] = (route.handler, route, match)
    if len(routes) != len(wanted):
        return app_handler
    post = hdrs.METH_POST
    expect = hdrs.EXPECT

    def handle(base: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # A plain function handing over one coroutine: no coroutine of its own per request.
        hit = routes.get(base.raw_path) if base.method == post else None
        if hit is None or expect in base.headers:
            return app_handler(base)
        request = cast(web.Request, base)  # made by the application's request factory
        handler, route, match = hit
        request._match_info = match  # as Application._handle sets it
        return guard(request, handler, route)

    return handle
