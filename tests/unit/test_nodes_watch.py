"""``fleetmq nodes --watch``'s table: events applied to the listed nodes, data escaped."""

from __future__ import annotations

from typing import Any

from fleetmq.commands.fleet_table import row_of, shown
from fleetmq.commands.nodes_watch import WatchedFleet


def event(node_id: str, to: str, **fields: Any) -> dict[str, Any]:
    return {"node_id": node_id, "to": to, "reason": fields.pop("reason", "heartbeat"),
            "node_type": "picclaw", "location": None, "last_seen": None, **fields}


def fleet_of(*ids: str, status: str = "online", **filters: str) -> WatchedFleet:
    fleet = WatchedFleet(filters, None)
    fleet.nodes = {i: {"id": i, "type": "picclaw", "status": status} for i in ids}
    return fleet


def test_a_transition_updates_its_node_and_a_deletion_removes_it() -> None:
    fleet = fleet_of("a", "b")
    fleet.apply(event("a", "offline", reason="connection_lost",
                      last_seen="2026-12-05T07:00:00.000Z"))
    fleet.apply(event("b", "deleted", reason="deleted"))
    assert list(fleet.nodes) == ["a"]
    assert (fleet.nodes["a"]["status"], fleet.nodes["a"]["status_reason"],
            fleet.nodes["a"]["last_seen"]) == ("offline", "connection_lost",
                                               "2026-12-05T07:00:00.000Z")


def test_a_registration_adds_its_node_and_a_status_filter_keeps_only_its_state() -> None:
    fleet = WatchedFleet({"status": "offline"}, None)
    fleet.nodes = {"a": {"id": "a", "status": "offline"}}
    fleet.apply(event("a", "online", reason="registered"))  # left the state shown
    fleet.apply(event("n", "offline", reason="heartbeat_timeout"))  # entered it
    assert list(fleet.nodes) == ["n"]


def test_a_table_of_the_first_n_asks_to_be_listed_again_when_they_change() -> None:
    fleet = WatchedFleet({}, 2)
    fleet.nodes = {"a": {"id": "a"}, "c": {"id": "c"}}
    assert fleet.apply(event("d", "online", reason="registered"))  # past the last: not shown
    assert fleet.apply(event("a", "offline"))  # a change within the table
    assert sorted(fleet.nodes) == ["a", "c"]
    assert fleet.nodes["a"]["status"] == "offline"
    assert not fleet.apply(event("b", "online", reason="registered"))  # now among the first 2
    assert not fleet.apply(event("a", "deleted", reason="deleted"))  # a gap to fill
    unlimited = WatchedFleet({}, None)
    unlimited.nodes = {"a": {"id": "a"}}
    assert unlimited.apply(event("a", "deleted", reason="deleted"))
    assert unlimited.apply(event("b", "online", reason="registered"))
    assert sorted(unlimited.nodes) == ["b"]


def test_a_node_that_moves_away_from_the_location_shown_leaves_the_table() -> None:
    fleet = WatchedFleet({"location": "Lab"}, None)
    fleet.nodes = {"a": {"id": "a", "location": "lab"}}
    fleet.apply(event("b", "online", reason="registered", location="LAB"))
    fleet.apply(event("a", "online", reason="registered", location="roof"))
    assert list(fleet.nodes) == ["b"]


def test_control_characters_in_node_data_are_escaped_not_sent_to_the_terminal() -> None:
    attack = "lab\x1b[2J\x1b]0;owned\x07\r\nrow\x9b31m"
    cell = shown(attack)
    assert cell == "lab\\x1b[2J\\x1b]0;owned\\x07\\r\\nrow\\x9b31m"
    assert all(c.isprintable() for c in cell)
    row = row_of({"id": "n1", "type": "pic\x1bclaw", "status": "online",
                  "location": attack}, 0.0)
    assert all(cell.isprintable() for cell in row)
    assert shown("plain-text é ✓") == "plain-text é ✓"  # printable text is left alone
