"""Token buckets, keyed limiters and the failed-login back-off, driven by a fake ``now``."""

from __future__ import annotations

import pytest

from fleetmq.auth.limits import KeyedLimiter, LoginBackoff, TokenBucket


def test_token_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=10, burst=20)
    assert [bucket.take(100.0) for _ in range(20)] == [0.0] * 20
    assert bucket.take(100.0) == pytest.approx(0.1)


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2, burst=4)
    for _ in range(4):
        bucket.take(0.0)
    assert bucket.take(0.5) == 0.0  # one token back after half a second
    assert bucket.take(0.5) == pytest.approx(0.5)
    # A long pause refills to the burst and no further.
    assert [bucket.take(1000.0) for _ in range(5)][-1] == pytest.approx(0.5)


def test_token_bucket_refusal_takes_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take(0.0) == 0.0
    for _ in range(100):
        assert bucket.take(0.5) > 0
    assert bucket.take(1.0) == 0.0


def test_token_bucket_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    bucket.take(10.0)
    assert bucket.take(5.0) > 0
    assert bucket.take(11.0) == 0.0


def test_token_bucket_takes_several_tokens_at_once() -> None:
    bucket = TokenBucket(rate=1, burst=10)
    assert bucket.take(0.0, n=8) == 0.0
    assert bucket.take(0.0, n=3) == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 5), (1, 0)])
def test_token_bucket_refuses_meaningless_figures(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate, burst)


def test_keyed_limiter_keeps_one_bucket_per_key() -> None:
    limiter = KeyedLimiter(rate=1, burst=2)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0  # another key is untouched


def test_keyed_limiter_memory_stays_bounded_under_a_flood_of_new_keys() -> None:
    limiter = KeyedLimiter(rate=1, burst=5, max_keys=1000)
    for i in range(50_000):
        limiter.take(f"k{i}", 0.0)
        assert len(limiter) <= 1000


def test_keyed_limiter_drops_idle_buckets_before_busy_ones() -> None:
    limiter = KeyedLimiter(rate=1, burst=3, max_keys=10)
    for _ in range(3):
        limiter.take("busy", 100.0)  # emptied just now
    for i in range(9):
        limiter.take(f"idle{i}", 0.0)  # full again by t=100
    limiter.take("new", 100.0)
    assert limiter.take("busy", 100.0) > 0  # still remembered, still empty


def test_backoff_blocks_the_eleventh_failure_in_a_minute_for_a_minute() -> None:
    backoff = LoginBackoff()
    for i in range(10):
        backoff.failed("10.0.0.1", "none", 100.0 + i)
        assert backoff.retry_after("10.0.0.1", "none", 100.0 + i) == 0.0
    backoff.failed("10.0.0.1", "none", 110.0)
    assert backoff.retry_after("10.0.0.1", "none", 110.0) == pytest.approx(60.0)
    assert backoff.retry_after("10.0.0.1", "none", 169.9) > 0
    assert backoff.retry_after("10.0.0.1", "none", 170.0) == 0.0


def test_backoff_counts_only_failures_within_the_window() -> None:
    backoff = LoginBackoff(limit=10, window_s=60)
    for i in range(30):  # one every 7 s: never 10 within a minute
        backoff.failed("a", "x", i * 7.0)
        assert backoff.retry_after("a", "x", i * 7.0) == 0.0


def test_backoff_further_failures_while_blocked_extend_the_block() -> None:
    backoff = LoginBackoff(limit=2, window_s=60)
    for t in (0.0, 1.0, 2.0):
        backoff.failed("a", "x", t)
    backoff.failed("a", "x", 50.0)
    assert backoff.retry_after("a", "x", 100.0) == pytest.approx(10.0)


def test_backoff_is_per_address_and_identity_pair() -> None:
    backoff = LoginBackoff(limit=3)
    for _ in range(4):
        backoff.failed("a", "x", 0.0)
    assert backoff.retry_after("a", "x", 0.0) > 0
    assert backoff.retry_after("a", "y", 0.0) == 0.0
    assert backoff.retry_after("b", "x", 0.0) == 0.0


def test_backoff_memory_stays_bounded_under_a_flood_of_identities() -> None:
    backoff = LoginBackoff(max_pairs=500)
    for i in range(20_000):
        backoff.failed("a", f"id{i}", float(i))
        assert len(backoff) <= 500


def test_backoff_keeps_a_blocked_pair_while_forgetting_stale_ones() -> None:
    backoff = LoginBackoff(limit=1, window_s=60, max_pairs=10)
    backoff.failed("attacker", "x", 99.0)
    backoff.failed("attacker", "x", 100.0)  # blocked until 160
    for i in range(9):
        backoff.failed("old", f"id{i}", 1.0)  # stale by t=100
    backoff.failed("new", "y", 101.0)
    assert backoff.retry_after("attacker", "x", 101.0) > 0
