"""Per-node message rates and the flood watch (contract sections 8 "Limits" and 11)."""

from __future__ import annotations

import contextlib

import pytest

from fleetmq.rates import CUT_OFF_S, NodeRates, RateLimitedError


def send(rates: NodeRates, node_id: str, now: float) -> RateLimitedError | None:
    try:
        rates.check(node_id, now)
    except RateLimitedError as refused:
        return refused
    return None


def test_a_node_gets_its_burst_then_its_rate() -> None:
    rates = NodeRates(rate=5, burst=20)
    assert [send(rates, "n1", 0.0) for _ in range(20)] == [None] * 20
    refused = send(rates, "n1", 0.0)
    assert refused is not None
    assert refused.retry_after_s == pytest.approx(0.2)
    assert send(rates, "n1", 0.2) is None  # one more a fifth of a second later
    assert send(rates, "n2", 0.2) is None  # another node is not touched
    assert rates.refused == 1


def test_a_node_over_its_rate_gets_at_most_one_answer_a_second() -> None:
    rates = NodeRates(rate=1, burst=1)
    send(rates, "n1", 0.0)
    answers = [r.answer for r in (send(rates, "n1", 0.01 * i) for i in range(1, 100)) if r]
    assert answers.count(True) == 1
    later = send(rates, "n1", 1.5)
    assert later is None or later.answer


def test_a_node_flooding_past_ten_times_its_rate_for_ten_seconds_is_cut_off_once() -> None:
    rates = NodeRates(rate=5, burst=20)
    cut: list[tuple[str, float]] = []
    now = 0.0
    rates.add_flood_listener(lambda node_id: cut.append((node_id, now)))
    while now < 11.0:  # 60 messages a second: 12 times the rate
        send(rates, "flooder", now)
        now += 1 / 60
    assert [node for node, _ in cut] == ["flooder"]
    assert 8.0 <= cut[0][1] <= 11.0
    while now < CUT_OFF_S:  # still flooding: no second notice within the cut-off
        send(rates, "flooder", now)
        now += 1 / 60
    assert len(cut) == 1
    while now < CUT_OFF_S + 12.0:
        send(rates, "flooder", now)
        now += 1 / 60
    assert len(cut) == 2  # past the cut-off, flooding again: cut off again


def test_a_node_at_twice_its_rate_is_limited_but_never_cut_off() -> None:
    rates = NodeRates(rate=5, burst=20)
    cut: list[str] = []
    rates.add_flood_listener(cut.append)
    now = 0.0
    while now < 60.0:
        send(rates, "eager", now)
        now += 1 / 10
    assert cut == []
    assert rates.refused > 0


def test_a_key_speaking_for_a_node_has_its_own_budget_and_never_gets_the_node_cut_off() -> None:
    rates = NodeRates(rate=5, burst=20)
    cut: list[str] = []
    rates.add_flood_listener(cut.append)
    now = 0.0
    while now < 30.0:  # a key flooding node n1 at 60 a second
        send_as(rates, "n1", now, "_key.k1")
        now += 1 / 60
    assert cut == []
    assert rates.refused > 0
    assert [send(rates, "n1", now) for _ in range(20)] == [None] * 20  # n1's own, untouched


def send_as(rates: NodeRates, node_id: str, now: float, sender: str) -> None:
    with contextlib.suppress(RateLimitedError):
        rates.check(node_id, now, sender)
