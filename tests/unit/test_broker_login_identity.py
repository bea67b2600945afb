"""How the embedded broker's login back-off remembers a presented username (no sockets)."""

from __future__ import annotations

from fleetmq.auth.limits import LoginBackoff
from fleetmq.broker.amqtt_broker import identity_key


def test_long_and_missing_usernames_are_remembered_compactly() -> None:
    assert identity_key(None) == identity_key("") == "none"
    assert identity_key("node-a") == "node-a"
    key = identity_key("x" * 10_240)
    assert key.startswith("sha256:")
    assert len(key) < 80
    assert identity_key("x" * 10_240) != identity_key("x" * 10_241)


def test_the_eleventh_failed_login_of_a_pair_in_a_minute_is_in_back_off() -> None:
    backoff = LoginBackoff(limit=10, window_s=60)
    who = identity_key("y" * 5000)
    for n in range(10):
        backoff.failed("10.0.0.1", who, float(n))
        assert backoff.retry_after("10.0.0.1", who, float(n)) == 0.0
    backoff.failed("10.0.0.1", who, 10.0)
    assert backoff.retry_after("10.0.0.1", who, 10.0) > 0
    assert backoff.retry_after("10.0.0.2", who, 10.0) == 0.0
