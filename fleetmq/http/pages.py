"""Answers of ``GET /nodes`` kept while the fleet does not change, and the document around a
page's nodes.

Dashboards poll the same pages (the whole fleet, the first page, a filter) again and again; an
answer stays right until the registry's version moves, so each one is built once per change of
the fleet. A page read while heartbeats arrive is rebuilt from each node's cached JSON, which is
cheap; what is kept here is only what saves the join of a whole page.
"""

from __future__ import annotations

from collections import OrderedDict

from fleetmq.views import dumps

PageKey = tuple[str | None, ...]
"""What decides a page: ``after``, ``limit`` and the filters, as the query gave them."""

CACHE_BYTES = 16 * 1024 * 1024
"""Answers kept at most, in bytes (a page of 1,000 typical nodes is about 450 KB)."""


class PageCache:
    """Whole answers by query, all of one registry version; the first look after a change of
    the fleet drops them. Least recently used answers go first past ``max_bytes``."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._version = -1
        self._bytes = 0
        self._pages: OrderedDict[PageKey, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pages)

    def get(self, key: PageKey, version: int) -> bytes | None:
        if version != self._version:
            self._reset(version)
            return None
        body = self._pages.get(key)
        if body is not None:
            self._pages.move_to_end(key)
        return body

    def put(self, key: PageKey, version: int, body: bytes) -> None:
        """Keep ``body``, the answer to ``key`` as of ``version`` (the caller checked that
        the fleet did not change while it was built)."""
        if version != self._version:
            self._reset(version)
        if len(body) > self._max_bytes:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._pages[key] = body
        self._bytes += len(body)
        while self._bytes > self._max_bytes:
            _, dropped = self._pages.popitem(last=False)
            self._bytes -= len(dropped)

    def _reset(self, version: int) -> None:
        self._pages.clear()
        self._bytes = 0
        self._version = version


def document(parts: list[bytes], total: int, next_id: str | None = None,
             event_id: str | None = None) -> bytes:
    """``{"nodes": [...], "count", "total", "next", "event_id"}`` around the nodes' JSON,
    copied once."""
    tail = b"]," + dumps({"count": len(parts), "total": total, "next": next_id,
                          "event_id": event_id})[1:]
    if not parts:
        return b'{"nodes":[' + tail
    if len(parts) == 1:
        return b'{"nodes":[' + parts[0] + tail
    # One join for the whole answer: the head and the tail go onto the first and last node
    # (small copies) instead of concatenating the joined nodes again (two more whole copies).
    first, last = parts[0], parts[-1]
    parts[0] = b'{"nodes":[' + first
    parts[-1] = last + tail
    try:
        return b",".join(parts)
    finally:
        parts[0], parts[-1] = first, last
