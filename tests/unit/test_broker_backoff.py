"""The embedded broker's failed-login back-off, driven by a fake clock (no sockets)."""

from __future__ import annotations

import pytest

from fleetmq.broker.backoff import LoginBackoff, identity_key


def fail(backoff: LoginBackoff, times: int, now: float, address: str = "10.0.0.1",
         identity: str | None = "node-a") -> None:
    for _ in range(times):
        backoff.failed(address, identity, now)


def test_ten_failures_in_a_minute_put_the_pair_in_back_off_for_a_minute() -> None:
    backoff = LoginBackoff(limit=10, window_s=60)
    fail(backoff, 9, now=0.0)
    assert backoff.retry_after("10.0.0.1", "node-a", 1.0) == 0.0
    backoff.failed("10.0.0.1", "node-a", 2.0)
    assert backoff.retry_after("10.0.0.1", "node-a", 2.0) == pytest.approx(60.0)
    assert backoff.retry_after("10.0.0.1", "node-a", 61.0) == pytest.approx(1.0)
    assert backoff.retry_after("10.0.0.1", "node-a", 62.5) == 0.0


def test_failures_spread_beyond_the_window_never_trigger_back_off() -> None:
    backoff = LoginBackoff(limit=10, window_s=60)
    for i in range(30):
        backoff.failed("10.0.0.1", "node-a", i * 7.0)  # 8 or 9 per minute
        assert backoff.retry_after("10.0.0.1", "node-a", i * 7.0) == 0.0


def test_back_off_is_per_address_and_identity() -> None:
    backoff = LoginBackoff(limit=10, window_s=60)
    fail(backoff, 10, now=0.0)
    assert backoff.retry_after("10.0.0.1", "node-a", 1.0) > 0
    assert backoff.retry_after("10.0.0.2", "node-a", 1.0) == 0.0
    assert backoff.retry_after("10.0.0.1", "node-b", 1.0) == 0.0
    assert backoff.retry_after("10.0.0.1", None, 1.0) == 0.0


def test_further_failures_extend_the_back_off() -> None:
    backoff = LoginBackoff(limit=10, window_s=60)
    fail(backoff, 10, now=0.0)
    backoff.failed("10.0.0.1", "node-a", 50.0)
    assert backoff.retry_after("10.0.0.1", "node-a", 100.0) == pytest.approx(10.0)


def test_memory_is_bounded_by_forgetting_the_least_recently_failed_pair() -> None:
    backoff = LoginBackoff(limit=2, window_s=60, max_pairs=3)
    fail(backoff, 2, now=0.0, identity="first")
    for name in ("b", "c", "d"):
        backoff.failed("10.0.0.1", name, 1.0)
    assert len(backoff) == 3
    assert backoff.retry_after("10.0.0.1", "first", 2.0) == 0.0  # forgotten


def test_long_and_missing_identities_are_remembered_compactly() -> None:
    assert identity_key(None) == identity_key("") == "none"
    key = identity_key("x" * 10_240)
    assert key.startswith("sha256:")
    assert len(key) < 80
    backoff = LoginBackoff(limit=1, window_s=60)
    backoff.failed("10.0.0.1", "x" * 10_240, 0.0)
    assert backoff.retry_after("10.0.0.1", "x" * 10_240, 1.0) > 0
