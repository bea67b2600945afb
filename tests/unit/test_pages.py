"""The kept answers of GET /nodes and the document around a page (fleetmq/http/pages.py)."""

from __future__ import annotations

import orjson

from fleetmq.http.pages import PageCache, document


def test_a_kept_answer_is_served_only_at_its_version() -> None:
    cache = PageCache()
    assert cache.get(("a",), 1) is None
    cache.put(("a",), 1, b"one")
    assert cache.get(("a",), 1) == b"one"
    assert cache.get(("b",), 1) is None
    assert cache.get(("a",), 2) is None  # the fleet changed: every answer goes
    assert len(cache) == 0
    cache.put(("a",), 2, b"two")
    assert cache.get(("a",), 2) == b"two"


def test_an_answer_put_at_a_newer_version_drops_the_older_ones() -> None:
    cache = PageCache()
    cache.put(("a",), 1, b"one")
    cache.put(("b",), 2, b"two")
    assert cache.get(("b",), 2) == b"two"
    assert cache.get(("a",), 2) is None


def test_the_least_recently_used_answers_go_past_the_byte_bound() -> None:
    cache = PageCache(max_bytes=10)
    cache.put(("a",), 1, b"aaaa")
    cache.put(("b",), 1, b"bbbb")
    assert cache.get(("a",), 1) == b"aaaa"  # now the most recently used
    cache.put(("c",), 1, b"cccc")
    assert cache.get(("b",), 1) is None
    assert cache.get(("a",), 1) == b"aaaa"
    assert cache.get(("c",), 1) == b"cccc"
    cache.put(("d",), 1, b"d" * 11)  # larger than the bound: not kept, nothing dropped
    assert cache.get(("d",), 1) is None
    assert len(cache) == 2
    cache.put(("a",), 1, b"aaaaaa")  # replaced in place, counted once
    assert cache.get(("c",), 1) == b"cccc"
    assert cache.get(("a",), 1) == b"aaaaaa"


def test_the_document_is_the_contract_shape_whatever_the_count() -> None:
    for count in (0, 1, 2, 5):
        parts = [orjson.dumps({"id": f"n{i}"}) for i in range(count)]
        kept = list(parts)
        body = orjson.loads(document(parts, 9, "n1" if count else None, "ab12.7"))
        assert body == {"nodes": [{"id": f"n{i}"} for i in range(count)], "count": count,
                        "total": 9, "next": "n1" if count else None, "event_id": "ab12.7"}
        assert parts == kept  # the caller's list is left as it was
