"""Modes and bootstrap (contract section 8): fleetmq never opens an unauthenticated listener
beyond this machine by accident, `--auth on` needs an admin key, an external broker needs
`--broker-auth`, and the first admin key comes from `--admin-token-file`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fleetmq.auth.service import AuthService
from fleetmq.auth.startup import AuthSetupError, decide_mode, warn_cleartext
from fleetmq.auth.store import MemoryAuthStore
from fleetmq.auth.tokens import token_kind
from fleetmq.config import AuthSettings, HttpSettings, StoreSettings
from fleetmq.core.clock import SystemClock
from tests.conftest import make_settings, running
from tests.support import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]


def serve(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``fleetmq serve`` that is expected to refuse to start: its exit code and messages."""
    return subprocess.run(
        [sys.executable, "-m", "fleetmq", "serve", "--store", f"sqlite:///{tmp_path / 'f.db'}",
         *options], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def test_a_listener_beyond_loopback_without_an_admin_key_exits_1_and_says_how(
        tmp_path: Path) -> None:
    done = serve(tmp_path, "--http", f"0.0.0.0:{free_port()}",
                 "--broker", f"embedded://127.0.0.1:{free_port()}")
    assert done.returncode == 1, done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("fleetmq: error:")]
    assert "0.0.0.0" in line
    assert "fleetmq keys create --role admin" in line
    assert "--auth off" in line
    # The embedded broker's address counts too.
    done = serve(tmp_path, "--http", f"127.0.0.1:{free_port()}",
                 "--broker", f"embedded://0.0.0.0:{free_port()}")
    assert done.returncode == 1
    assert "embedded MQTT broker" in done.stderr


def test_auth_on_without_an_admin_key_exits_1(tmp_path: Path) -> None:
    done = serve(tmp_path, "--auth", "on", "--http", f"127.0.0.1:{free_port()}",
                 "--broker", f"embedded://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "--auth on needs an admin key" in done.stderr


def test_auth_on_with_an_external_broker_needs_broker_auth(tmp_path: Path,
                                                           mosquitto: Mosquitto) -> None:
    done = serve(tmp_path, "--admin-token-file", str(tmp_path / "admin.token"),
                 "--http", f"127.0.0.1:{free_port()}", "--broker", mosquitto.url)
    assert done.returncode == 1
    assert "--broker-auth dynsec" in done.stderr
    assert "--broker-auth external" in done.stderr


def _auth() -> AuthService:
    return AuthService(MemoryAuthStore(), SystemClock())


def test_auth_off_on_purpose_runs_beyond_loopback_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings("embedded", "fleet", http=HttpSettings(host="0.0.0.0"),
                             auth=AuthSettings(mode="off"))
    with caplog.at_level(logging.WARNING):
        assert decide_mode(settings, _auth()) is False
    assert any("auth_off" in r.getMessage() for r in caplog.records)


def test_listeners_beyond_loopback_without_tls_are_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings("mqtt://broker.example.net:1883", "fleet",
                             http=HttpSettings(host="0.0.0.0"))
    with caplog.at_level(logging.WARNING):
        warn_cleartext(settings)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "cleartext_listener" in said
    assert "cleartext_broker" in said
    caplog.clear()
    tls = replace(settings, http=HttpSettings(host="0.0.0.0", tls_cert="c", tls_key="k"),
                  broker=replace(settings.broker, host="127.0.0.1"))
    with caplog.at_level(logging.WARNING):
        warn_cleartext(tls)
    assert not caplog.records


async def test_the_admin_token_file_is_made_once_then_adopted_at_every_start(
        tmp_path: Path, root: str) -> None:
    # memory:// keeps nothing: the file is how auth survives a restart there.
    token_file = tmp_path / "admin.token"
    settings = make_settings(f"embedded://127.0.0.1:{free_port()}", root,
                             store=StoreSettings("memory", ""),
                             auth=AuthSettings(admin_token_file=str(token_file)))
    async with running(settings) as first:
        assert first.auth_enabled
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert token_kind(token) == "key"
        verdict = first.auth.verify(token)
        assert verdict.principal is not None
        assert verdict.principal.is_admin
    async with running(settings) as second:  # an empty store: the same token is adopted
        assert second.auth_enabled
        assert token_file.read_text().strip() == token
        adopted = second.auth.verify(token)
        assert adopted.principal is not None
        assert adopted.principal.is_admin


async def test_a_bad_admin_token_file_stops_the_start(tmp_path: Path, root: str) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("not-a-token\n")
    settings = make_settings(f"embedded://127.0.0.1:{free_port()}", root,
                             auth=AuthSettings(admin_token_file=str(token_file)))
    with pytest.raises(AuthSetupError, match="does not hold an fmq_key_ token"):
        async with running(settings):
            pass


def test_a_websocket_listener_beyond_loopback_without_an_admin_key_exits_1(
        tmp_path: Path) -> None:
    done = serve(tmp_path, "--http", f"127.0.0.1:{free_port()}",
                 "--broker", f"embedded://127.0.0.1:{free_port()}",
                 "--broker-ws", f"0.0.0.0:{free_port()}")
    assert done.returncode == 1, done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("fleetmq: error:")]
    assert "WebSocket listener (--broker-ws)" in line
    assert "0.0.0.0" in line
    assert "--auth off" in line
