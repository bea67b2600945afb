"""An agent's credentials as given, and the files that keep node tokens (contract section 8).

A token given outright (``--token``), one kept in a file (``--token-file``), or one obtained
once by enrollment (``fleetmq.agent.enroll``) and then kept in the token file: mode 0600,
written atomically. Over MQTT the token is the password of the node's login (username = client
id = node id); over REST it is the bearer token. No network here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleetmq.auth.tokens import token_kind
from fleetmq.errors import ConfigError, FleetmqError


class EnrollmentError(FleetmqError):
    """The manager refused the enrollment for good (a wrong, spent or revoked key; an id that
    already has a credential; an id or type the key does not allow): retrying cannot help."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """An agent's credentials as given; ``check()`` refuses combinations that cannot work."""

    token: str | None = None
    token_file: str | None = None
    enroll_key: str | None = None
    enroll_api: str | None = None
    """The manager's REST URL to enroll at (http:// or https://)."""

    def check(self) -> None:
        if self.token is not None and token_kind(self.token) != "node":
            raise ConfigError("--token is not a node token (fmq_node_ and 43 characters): give "
                              "the token of the node's credential"
                              + (" (that is an enroll key: pass it as --enroll-key)"
                                 if token_kind(self.token) == "enr" else ""))
        if self.token is not None and (self.token_file or self.enroll_key):
            raise ConfigError("--token excludes --token-file and --enroll-key: give the token "
                              "itself, or a file to keep it in")
        if self.enroll_key is None:
            return
        if token_kind(self.enroll_key) != "enr":
            raise ConfigError("--enroll-key is not an enroll key (fmq_enr_ and 43 characters): "
                              "make one with `fleetmq keys create --role enroll`")
        if self.enroll_api is None:
            raise ConfigError("--enroll-key needs the manager's REST URL to enroll at: pass "
                              "--api (REST agents) or --enroll-api http(s)://host:port")


def read_token_file(path: str) -> str | None:
    """The node token kept in ``path``; None if the file is missing or empty."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {path}: cannot read it: {exc}") from exc
    if not text:
        return None
    if token_kind(text) != "node":
        raise ConfigError(f"--token-file {path} does not hold a node token (fmq_node_...): "
                          "fix or remove it")
    return text


def write_token_file(path: str, token: str) -> None:
    """Write the token so that a crash leaves the old file or the new one, never half of one:
    a temporary file (0600) in the same directory, synced, then renamed over ``path``."""
    write_secret_file(path, token + "\n")


def write_secret_file(path: str, text: str, option: str = "--token-file") -> None:
    """``text`` into ``path``, mode 0600, atomically (see ``write_token_file``)."""
    target = Path(path)
    directory = target.parent
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {directory}: "
                          f"{exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)  # mkstemp makes 0600 already; said again, as it is the point
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise ConfigError(f"{option} {path}: cannot write it: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):  # the rename is durable once the directory is synced
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def probe_writable(path: str, option: str = "--token-file") -> None:
    """ConfigError unless a file can be made in the token file's directory."""
    directory = Path(path).parent
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".probe.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {directory}: "
                          f"{exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(temp)


def read_tokens_file(path: str, option: str = "--token-file") -> dict[str, str]:
    """``node_id token`` lines (the simulator's kept tokens); empty if the file is missing."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path}: cannot read it: {exc}") from exc
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words:
            continue
        if len(words) != 2 or token_kind(words[1]) != "node":
            raise ConfigError(f"{option} {path} line {number} is not `<node id> <node token>`: "
                              "fix or remove the file")
        tokens[words[0]] = words[1]
    return tokens


def write_tokens_file(path: str, tokens: dict[str, str], option: str = "--token-file") -> None:
    write_secret_file(path, "".join(f"{node} {token}\n" for node, token in tokens.items()),
                      option)
