"""Access control at start: the first admin key from ``--admin-token-file``, the mode that
follows from ``--auth`` and the store, and the listeners that mode allows (contract section 8).

Decided once, before any listener opens; the mode is fixed for the process's life.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

from fleetmq.auth.service import AuthService
from fleetmq.auth.tokens import new_token, token_kind
from fleetmq.config import Settings
from fleetmq.errors import FleetmqError

log = logging.getLogger(__name__)


class AuthSetupError(FleetmqError):
    """Access control cannot start as configured (the CLI exits 1 with this sentence)."""


def is_loopback(host: str) -> bool:
    """A literal loopback address or a name that resolves to loopback addresses only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def listeners(settings: Settings) -> list[tuple[str, str, bool]]:
    """fleetmq's own listeners: (what, host, encrypted)."""
    own = [("REST API (--http)", settings.http.host, settings.http.tls_cert is not None)]
    if settings.broker.embedded:
        own.append(("embedded MQTT broker (--broker)", settings.broker.host, False))
    if settings.broker_tls is not None:
        own.append(("embedded MQTT broker's TLS listener (--broker-tls)",
                    settings.broker_tls.host, True))
    if settings.broker_ws is not None:
        own.append(("embedded MQTT broker's WebSocket listener (--broker-ws)",
                    settings.broker_ws.host, False))
    return own


async def adopt_admin_token_file(auth: AuthService, path: str) -> None:
    """If the file holds a token, that token is an admin key (added if unknown); if the file
    is missing, a new admin key is made and written there, mode 0600."""
    text = _read_token_file(path)
    if text is None:
        # The file first, then the key: a key that made the store require auth for good
        # while its token could not be written would lock everyone out.
        token = new_token("key")
        _write_token_file(path, token)
        try:
            await auth.create_key("admin", name="admin-token-file", actor="manager",
                                  token=token)
        except BaseException:
            _remove_token_file(path)
            raise
        log.warning("admin_token_created file=%s (keep it secret; it is shown nowhere else)",
                    path)
        return
    if token_kind(text) != "key":
        raise AuthSetupError(f"--admin-token-file {path} does not hold an fmq_key_ token: "
                             "remove the file to have a new admin key written there")
    verdict = auth.verify(text)
    if verdict.principal is not None:
        if not verdict.principal.is_admin:
            raise AuthSetupError(f"--admin-token-file {path} holds a key of role "
                                 f"{verdict.principal.role}, not admin")
        return
    if verdict.failure in ("revoked", "expired"):
        raise AuthSetupError(f"--admin-token-file {path} holds a {verdict.failure} key: "
                             "remove the file to have a new admin key written there")
    await auth.create_key("admin", name="admin-token-file", actor="manager", token=text)
    log.info("admin_token_adopted file=%s", path)


def _read_token_file(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthSetupError(f"--admin-token-file {path}: cannot read it: {exc}") from exc


def _write_token_file(path: str, token: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise AuthSetupError(f"--admin-token-file {path}: cannot create it: "
                             f"{exc.strerror}") from exc
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")


def _remove_token_file(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def decide_mode(settings: Settings, auth: AuthService) -> bool:
    """Whether auth is on, or AuthSetupError where the configuration is unsafe."""
    mode = settings.auth.mode
    if mode == "off":
        log.warning("auth_off: --auth off was given: anyone who reaches fleetmq's listeners "
                    "or the broker can read and change the fleet%s",
                    " (this store requires auth: it holds admin keys)" if auth.required else "")
        return False
    enabled = mode == "on" or auth.required
    if mode == "on" and not auth.has_valid_admin():
        raise AuthSetupError(
            "--auth on needs an admin key in the store: run `fleetmq keys create --role admin "
            "--store ...` first, or pass --admin-token-file FILE")
    if not enabled:
        for what, host, _tls in listeners(settings):
            if not is_loopback(host):
                raise AuthSetupError(
                    f"the {what} would listen on {host}, beyond this machine, while auth is off "
                    "(the store has no admin key): create one with `fleetmq keys create --role "
                    "admin` or pass --admin-token-file FILE, or pass --auth off to run open on "
                    "purpose")
        return False
    if not settings.broker.embedded and settings.auth.broker_auth == "none":
        raise AuthSetupError(
            "auth is on and the broker is external: pass --broker-auth dynsec (fleetmq manages "
            "Mosquitto's dynamic security plugin) or --broker-auth external (the broker checks "
            "logins itself, e.g. through fleetmq's HTTP hooks)")
    return True


def warn_cleartext(settings: Settings) -> None:
    """Tokens would cross the network in clear on a non-loopback listener without TLS."""
    for what, host, tls in listeners(settings):
        if not tls and not is_loopback(host):
            log.warning("cleartext_listener what=%s host=%s: tokens cross the network in clear; "
                        "use TLS", what, host)
    broker = settings.broker
    if not broker.embedded and broker.scheme == "mqtt" and not is_loopback(broker.host):
        log.warning("cleartext_broker url=%s: credentials cross the network in clear; use "
                    "mqtts://", broker.describe())
