"""The watch stream's position and filters, and the CORS origins, as the edge parses them."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from fleetmq.core.models import Rejection
from fleetmq.errors import ConfigError
from fleetmq.http.cors import check_origin
from fleetmq.http.watch import _match, _since
from fleetmq.store.base import HistoryEvent


def request(query: str = "", **headers: str):  # type: ignore[no-untyped-def]
    return make_mocked_request("GET", f"/api/v1/fleet/watch{query}",
                               headers={k.replace("_", "-"): v for k, v in headers.items()})


def test_a_position_comes_from_last_event_id_first_then_since() -> None:
    assert _since(request()) is None
    assert _since(request("?since=")) is None
    assert _since(request("?since=ab12.7")) == ("ab12", 7)
    assert _since(request("?since=ab12.7", Last_Event_ID="cd34.9")) == ("cd34", 9)


@pytest.mark.parametrize("text", ["12", "XY.1", "ab.", ".1", "ab.1.2", "ab.-1", "ab.1e3",
                                  "ab." + "9" * 19, "a" * 33 + ".1"])
def test_a_malformed_position_is_a_400_naming_where_it_came_from(text: str) -> None:
    with pytest.raises(Rejection) as caught:
        _since(request(f"?since={text}"))
    assert caught.value.code == 400
    assert "'since'" in caught.value.message
    with pytest.raises(Rejection, match="Last-Event-ID"):
        _since(request(Last_Event_ID=text))


def event(node_id: str, node_type: str | None, location: str | None) -> HistoryEvent:
    return HistoryEvent(1, node_id, node_type, location, None, "online", "registered", 0.0, 0.0)


def test_filters_match_the_events_own_fields() -> None:
    assert _match({}) is None
    by_type = _match({"node_type": "PicClaw"})
    assert by_type is not None
    assert by_type(event("a", "picclaw", None))
    assert not by_type(event("a", "microclaw", None))
    assert not by_type(event("a", None, None))  # migrated from version 1, node gone
    both = _match({"node_type": "picclaw", "location": "Roof"})
    assert both is not None
    assert both(event("a", "picclaw", "roof"))
    assert not both(event("a", "picclaw", None))
    one = _match({"node_id": "Node-1"})
    assert one is not None
    assert one(event("Node-1", "x", None))
    assert not one(event("node-1", "x", None))  # ids are case-sensitive


@pytest.mark.parametrize("origin", ["https://dash.example.com", "http://127.0.0.1:8081"])
def test_an_origin_is_scheme_host_and_port(origin: str) -> None:
    assert check_origin(origin) == origin


@pytest.mark.parametrize("origin", ["dash.example.com", "https://dash.example.com/",
                                    "https://dash.example.com/app", "ftp://x", "*",
                                    "https://user@dash.example.com"])
def test_anything_else_is_refused_with_the_form_to_use(origin: str) -> None:
    with pytest.raises(ConfigError, match="scheme://host"):
        check_origin(origin)
