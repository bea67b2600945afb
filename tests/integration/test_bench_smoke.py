"""Every benchmark, at a tiny size, as the command a user runs: it exits 0, prints its table and
writes its JSON result with positive figures. The figures mean nothing at this size; what this
catches is a benchmark broken by a change elsewhere (an API it uses, a metric it reads).

Each bench runs in a process group of its own with ``FLEETMQ_BENCH_RESULTS`` pointing at the
test's temporary directory (bench/results is left alone). A bench must stop what it started
(Mosquitto, ``fleetmq serve``, publishers, wrk): survivors fail the test, then are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _positive(doc: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert isinstance(doc[key], int | float), (key, doc[key])
        assert doc[key] > 0, (key, doc[key])


def _check_ingest(expected: set[str]) -> Callable[[dict[str, Any]], None]:
    def check(doc: dict[str, Any]) -> None:
        _positive(doc, "register_per_s", "published")
        results = {r["key"]: r for r in doc["results"]}
        assert set(results) == expected
        for r in results.values():
            _positive(r, "per_s", "counted")
            assert r["counted"] == r["published"] == doc["published"], r
            assert r["lost"] == 0, r

    return check


def _check_embedded(doc: dict[str, Any]) -> None:
    _check_ingest({"bare-mqtt-3.1.1", "fleetmq-mqtt-3.1.1"})(doc)
    assert doc["broker"] == "embedded"
    assert isinstance(doc["amqtt_puback_timeouts"], int)


def _check_lag(doc: dict[str, Any]) -> None:
    _positive(doc, "probes_answered", "lag_p50_ms", "lag_p99_ms", "lag_max_ms", "lag_mean_ms")
    assert doc["lag_p50_ms"] <= doc["lag_p99_ms"] <= doc["lag_max_ms"]


def _check_rest(doc: dict[str, Any]) -> None:
    runs = {r["scenario"]: r for r in doc["results"]}
    assert set(runs) == {"heartbeat-bare", "heartbeat", "register", "get-one", "list-80-bare",
                         "list-80", "list-80-mqtt", "page-20-bare", "page-20", "page-20-mqtt"}
    for r in runs.values():
        _positive(r, "rps", "p50_ms", "p99_ms")
        assert r["errors"] == 0, r
        assert r["non_2xx"] == 0, r
    _positive(runs["list-80-mqtt"], "mqtt_published", "mqtt_eventually_applied")
    _positive(runs["page-20-mqtt"], "mqtt_published", "mqtt_eventually_applied")
    assert doc["fleet"] == 80


def _check_memory(doc: dict[str, Any]) -> None:
    (result,) = doc["results"]
    assert result["nodes"] == 2000
    _positive(result, "registered", "views", "total_with_views", "total_with_telemetry",
              "register_per_s", "view_bytes_avg")
    assert doc["breakdown_bytes"]
    assert all(size >= 0 for size in doc["breakdown_bytes"].values())


def _check_expiry(doc: dict[str, Any]) -> None:
    assert [r["scenario"] for r in doc["results"]] == ["deadlines over 1 s",
                                                      "all deadlines at once"]
    for r in doc["results"]:
        assert r["expired"] == r["nodes"] == 2000
        _positive(r, "cpu_s", "simulated_s", "ticks", "expire_calls")
        assert 0 <= r["lateness_p50_s"] <= r["lateness_p99_s"] <= r["lateness_max_s"] < 2


def _check_scrape(doc: dict[str, Any]) -> None:
    assert [r["nodes"] for r in doc["results"]] == [10, 2000]
    for r in doc["results"]:
        _positive(r, "render_p50_us", "render_max_us", "bytes")


def _check_partition_sim(doc: dict[str, Any]) -> None:
    assert doc["simulation"] is True
    runs = {(r["change"], r["scheme"].split()[0]): r for r in doc["results"]}
    assert len(runs) == 6
    for change in ("a member leaves (4 -> 3)", "a member joins (4 -> 5)"):
        modulo, ring, buckets = (runs[change, s] for s in ("modulo", "consistent", "64"))
        assert 0 < buckets["moved"] < modulo["moved"] < doc["nodes"]
        assert 0 < ring["moved"] < modulo["moved"]
        for r in (modulo, ring, buckets):  # the grace holds a verdict at most an interval more
            assert 0 <= r["held_p50_s"] <= r["held_max_s"] <= doc["interval_s"] + r["takeover_s"]
    for r in doc["round_robin"]:
        assert 0 < r["nodes_falsely_offline_share"] <= 1
        _positive(r, "false_verdicts_per_node_per_hour", "analytic_run_share")


def _check_expiry_serve(doc: dict[str, Any]) -> None:
    assert [r["scenario"] for r in doc["results"]] == ["paced", "storm"]
    for r in doc["results"]:
        assert r["expired"] == r["nodes"] == 2000
        _positive(r, "register_per_s", "wave_s", "polls")
        assert r["cpu_share"] >= 0  # a wave this small may fit in one clock tick of /proc
        assert 0 <= r["late_p50_s"] <= r["late_p99_s"] <= r["late_max_s"] < 2


def _check_hooks(doc: dict[str, Any]) -> None:
    assert doc["storm"]["allowed"] == doc["storm"]["logins"] == 200
    assert doc["authorize"]["allowed"] == doc["authorize"]["calls"] == 300
    _positive(doc["storm"], "per_s")
    _positive(doc["authorize"], "per_s")
    assert 0 <= doc["revocation_s"]["median"] <= doc["revocation_s"]["max"] < 2


def _check_embedded_auth(doc: dict[str, Any]) -> None:
    assert [r["auth"] for r in doc["runs"]] == [False, True]
    for r in doc["runs"]:
        _positive(r, "connects_per_s", "heartbeats_per_s")
        assert r["connects_refused"] == 0, r
        assert r["heartbeats_applied"] == r["heartbeats_published"], r
    revoked = doc["runs"][1]["revocation_ms"]
    assert len(revoked) == 2
    assert all(0 < ms < 1000 for ms in revoked), revoked


def _check_auth_cost(doc: dict[str, Any]) -> None:
    ingest = doc["ingest"]
    pairs = {r["key"]: r for r in ingest["results"]}
    assert set(pairs) == {"bare", "fleetmq-5", "fleetmq-3.1.1"}
    for pair in pairs.values():
        assert pair["ratio"] > 0, pair
        assert len(pair["off"]) == len(pair["on"]) == ingest["rounds"] == 2
        for r in pair["off"] + pair["on"]:
            _positive(r, "per_s", "counted")
            assert r["counted"] == r["published"], r
            assert r["lost"] == 0, r
    runs = {r["scenario"]: r for r in doc["rest"]["results"]}
    assert set(runs) == {"heartbeat", "get-one", "list-20"}
    for r in runs.values():
        assert r["ratio"] > 0, r
        for side in r["off"] + r["on"]:
            _positive(side, "rps", "p50_ms", "p99_ms")
            assert side["errors"] == 0, r
            assert side["non_2xx"] == 0, r  # the bearer keys were accepted


def _check_filtered(doc: dict[str, Any]) -> None:
    [result] = doc["results"]
    rows = {r["query"]: r for r in result["rows"]}
    assert (rows["offline, limit 1"]["total"], rows["offline, limit 1"]["count"]) == (400, 1)
    assert rows["offline + type, limit 1"]["total"] == 400
    assert rows["online, limit 1"]["total"] == 1600
    assert rows["degraded (none), limit 1"]["total"] == 0
    assert rows["offline + location, limit 1"]["total"] == 1
    for row in result["rows"][1:]:
        _positive(row, "p50_ms", "max_ms")


def _check_serve_memory(doc: dict[str, Any]) -> None:
    _positive(doc, "rate", "done", "idle_mb", "registered_mb", "read_mb", "read_bytes")
    assert doc["nodes"] == 2000
    assert doc["credentials"] == {}


def _check_serve_memory_credentials(doc: dict[str, Any]) -> None:
    _positive(doc, "rate", "done", "idle_mb", "registered_mb", "read_mb", "read_bytes")
    _positive(doc["credentials"], "issued_per_s", "issued_mb", "logins_per_s", "logged_in_mb")
    assert doc["nodes"] == 2000


def _check_status_wave(doc: dict[str, Any]) -> None:
    _positive(doc, "online", "offline_rate")
    assert doc["offline_nodes"] == doc["offline"] == doc["nodes"] == 2000


def _check_takeover(doc: dict[str, Any]) -> None:
    [run] = doc["takeovers"]
    assert run["nodes"] == run["active_republished"] == run["statuses_received"] == 2000
    _positive(run, "active_ready_s", "standby_ready_s", "kill_to_ready_s",
              "kill_to_first_status_s", "kill_to_manager_online_s", "kill_to_all_statuses_s",
              "takeovers_total", "active_rss_mb", "standby_rss_mb", "new_active_rss_mb")
    if run["kill_to_ready_s"] < 4:  # taken over within the will's 5 s delay: no offline flash
        assert run["kill_to_manager_offline_s"] is None, run
    follow = doc["follow"]
    assert follow["registered"] > 0, follow
    _positive(follow["loaded"], "active_applied_per_s", "heartbeats_sent_per_s")
    assert follow["loaded"]["standby_cpu_pct"] >= 0  # a short window may fit in one tick


@dataclass(frozen=True)
class Bench:
    argv: tuple[str, ...]
    result: str
    """The JSON file it writes."""
    printed: tuple[str, ...]
    """Lines of its table that must be in its output."""
    check: Callable[[dict[str, Any]], None]
    mosquitto: bool = True
    postgres: bool = False


def _check_watch(doc: dict[str, Any]) -> None:
    quiet, watched = doc["runs"]
    assert (quiet["watchers"], watched["watchers"]) == (0, 3)
    for run in (quiet, watched):
        _positive(run, "applied_per_s", "published", "transitions")
        assert run["applied"] == run["published"], run
    # Every watcher got every event of the watched run, none lost.
    assert watched["events_min"] == watched["events_max"] == watched["transitions"]
    assert watched["lag_p50_ms"] <= watched["lag_p99_ms"]


def _check_dynsec(doc: dict[str, Any]) -> None:
    [size] = doc["sizes"]
    assert size["clients"] == 200
    assert size["puts_per_s"] > 0
    assert 0 < size["revoke_ms_median"] < 1000  # the 1 s of the contract, even here


BENCHES = {
    "ingest": Bench(
        ("bench/ingest.py", "--nodes", "100", "--messages", "1000", "--publishers", "1"),
        "ingest.json",
        ("bare paho subscriber, MQTT 5", "fleetmq applied, MQTT 5 (default)",
         "fleetmq applied, --mqtt-version 3.1.1", "ratio to the bare paho 3.1.1 subscriber",
         "bare gmqtt subscriber, MQTT 5", "ratio to the bare gmqtt MQTT 5 subscriber"),
        _check_ingest({"bare-mqtt-3.1.1", "bare-mqtt-5", "bare-gmqtt-5", "bare-gmqtt-3.1.1",
                       "fleetmq-mqtt-5", "fleetmq-mqtt-3.1.1"})),
    "ingest-embedded": Bench(
        ("bench/ingest.py", "--broker", "embedded", "--nodes", "100", "--messages", "1000",
         "--publishers", "1"),
        "ingest-embedded.json",
        ("embedded amqtt", "bare paho subscriber, MQTT 3.1.1", "fleetmq applied, MQTT 3.1.1",
         "amqtt PUBACK timeouts"),
        _check_embedded, mosquitto=False),
    "embedded-auth": Bench(
        ("bench/embedded_auth.py", "--connects", "50", "--nodes", "50", "--messages", "500",
         "--publishers", "1", "--revocations", "2", "--credentials", "200"),
        "embedded_auth.json",
        ("auth off: connects", "auth on, 200 credentials: heartbeats applied",
         "auth on, 200 credentials: revoke -> closed"),
        _check_embedded_auth, mosquitto=False),
    "auth-cost": Bench(
        ("bench/auth_cost.py", "--nodes", "100", "--messages", "1000", "--publishers", "1",
         "--rest-nodes", "20", "--duration", "1", "--threads", "1", "--connections", "4",
         "--rounds", "2"),
        "auth_cost.json",
        ("bare paho subscriber, 3.1.1, dynsec login", "fleetmq applied, MQTT 5, auth on",
         "fleetmq applied, MQTT 3.1.1, auth on", "auth on / auth off", "heartbeat (write key)",
         "list 20 (read key)"),
        _check_auth_cost),
    "lag": Bench(
        ("bench/lag.py", "--nodes", "100", "--rate", "500", "--seconds", "5"),
        "lag.json", ("probes answered", "lag p50 / p99 / max"), _check_lag),
    "rest": Bench(
        ("bench/rest.py", "--duration", "1", "--threads", "1", "--connections", "4",
         "--nodes", "50", "--fleet", "80", "--page", "20", "--rate", "500"),
        "rest.json", ("heartbeat, bare aiohttp", "get one", "list 80 + 500 hb/s MQTT",
                      "page 20 of 80 + 500 hb/s MQTT"),
        _check_rest),
    "memory": Bench(
        ("bench/memory.py", "--nodes", "2000", "--fix", "none"),
        "memory.json", ("bytes of RSS per node", "where one node's bytes go"), _check_memory,
        mosquitto=False),
    "filtered": Bench(
        ("bench/filtered.py", "--nodes", "2000", "--offline", "0.2", "--repeat", "2"),
        "filtered.json", ("offline, limit 1", "offline + type, limit 1"), _check_filtered),
    "serve-memory": Bench(
        ("bench/serve_memory.py", "--nodes", "2000", "--slices", "2"),
        "serve_memory.json", ("RSS after the read", "registrations/s"), _check_serve_memory),
    "status-wave": Bench(
        ("bench/status_wave.py", "--nodes", "2000", "--timeout", "3"),
        "status_wave.json", ("offline statuses/s", "CPU during the wave"),
        _check_status_wave),
    "serve-memory-credentials": Bench(
        ("bench/serve_memory.py", "--nodes", "2000", "--slices", "2", "--credentials"),
        "serve_memory.json", ("node credentials issued", "RSS after the read"),
        _check_serve_memory_credentials),
    "expiry": Bench(
        ("bench/expiry.py", "--nodes", "2000", "--spread", "1", "--timeout", "5"),
        "expiry.json", ("deadlines over 1 s", "all deadlines at once"), _check_expiry,
        mosquitto=False),
    "scrape": Bench(
        ("bench/scrape.py", "--nodes", "2000", "--rounds", "20"),
        "scrape.json", ("render p50",), _check_scrape, mosquitto=False),
    "partition-sim": Bench(
        ("bench/partition_sim.py", "--nodes", "2000", "--rr-nodes", "200", "--samples", "500",
         "--vnodes", "16"),
        "partition_sim.json", ("SIMULATION", "a member leaves (4 -> 3)", "round robin"),
        _check_partition_sim, mosquitto=False),
    "expiry-serve": Bench(
        ("bench/expiry_serve.py", "--nodes", "2000", "--offline-after", "8", "--rate", "1000"),
        "expiry_serve.json", ("paced", "storm"), _check_expiry_serve),
    "hooks": Bench(
        ("bench/hooks.py", "--nodes", "200", "--credentials", "1000", "--authorize", "300",
         "--revocations", "2", "--concurrency", "8"),
        "hooks.json", ("reconnect storm: 200 logins", "authorize: 300 calls",
                       "revocation by the CLI path"), _check_hooks),
    "watch": Bench(
        ("bench/watch.py", "--nodes", "100", "--messages", "1000", "--publishers", "1",
         "--watchers", "0", "3", "--rounds", "1", "--transitions", "0.1"),
        "watch.json", ("0 watchers", "3 watchers"), _check_watch),
    "dynsec": Bench(
        ("bench/dynsec.py", "--sizes", "200", "--puts", "2", "--revokes", "1"),
        "dynsec.json", ("clients", "revoke ms median"), _check_dynsec),
    "takeover": Bench(
        ("bench/takeover.py", "--nodes", "2000", "--follow-nodes", "2000", "--rate", "1000",
         "--registrations", "20", "--window", "2", "--idle-window", "1", "--warmup", "1"),
        "takeover.json", ("kill -9 A -> B /readyz 200", "kill -> first node status from B",
                          "B's CPU (2 s window)"),
        _check_takeover, postgres=True),
}


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    survivors: list[int] = []
    try:
        out, _ = proc.communicate(timeout=timeout)
        deadline = time.monotonic() + 5  # the bench has exited; its children are on their way
        while (survivors := _group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not survivors, f"{argv[1]} left processes running: {survivors}"
    return subprocess.CompletedProcess(argv, proc.returncode, out)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.mosquitto] if bench.mosquitto else [])
    for name, bench in BENCHES.items()
])
@pytest.mark.timeout(300)  # rest.py may first install wrk with apt-get
def test_bench_runs_and_reports(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    bench = BENCHES[name]
    if bench.mosquitto:
        request.getfixturevalue("mosquitto")  # skips, or fails in CI, without Mosquitto
    if bench.postgres:
        request.getfixturevalue("postgres_server")  # the same without PostgreSQL
    if name in ("rest", "auth-cost") and shutil.which("wrk") is None and os.geteuid() != 0:
        pytest.skip("wrk is not installed and bench/rest.py installs it only as root "
                    "(apt-get install wrk)")
    env = {**os.environ, "FLEETMQ_BENCH_RESULTS": str(tmp_path)}
    done = _run([sys.executable, *bench.argv], env, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    for line in (*bench.printed, f"written: {tmp_path / bench.result}"):
        assert line in done.stdout, (line, done.stdout[-4000:])
    bench.check(json.loads((tmp_path / bench.result).read_text()))
