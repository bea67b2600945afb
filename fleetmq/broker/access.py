"""Who may log in to the embedded broker, and what a logged-in client may publish, subscribe
to and leave as its will (contract section 8: Brokers, Topic rules).

Decisions only, over ``AuthService`` (tokens) and ``TopicRules`` (topics); amqtt is not
imported here, so the broker module applies these at the right moments and this module can be
read (and tested) without it. Every refusal is counted by reason for ``/metrics``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fleetmq.auth.limits import KeyedLimiter
from fleetmq.auth.rules import MANAGER_CLIENT_PREFIX, Principal, TopicRules
from fleetmq.auth.service import AuthService
from fleetmq.metrics import RateLimitedLog

log = logging.getLogger(__name__)
_limited = RateLimitedLog(log)

MANAGER_USERNAME = MANAGER_CLIENT_PREFIX
"""The username of the manager's own connections; their password is the process's secret."""

# MQTT 3.1.1 CONNACK return codes.
BAD_USERNAME_OR_PASSWORD = 4
NOT_AUTHORISED = 5

_BEYOND_RIGHTS = ("identity", "role", "client_id")
SENT_WINDOW_S = 10.0
MAX_TRACKED = 100_000

# Why a CONNECT is refused (metrics.LOGIN_REFUSALS): the token's failure (AuthService.verify),
# a wrong manager secret, a username that is not the token's identity, a client id that is not
# it, a key whose role has no broker rights, a will topic outside the client's own.


def origin_allowed_without_auth(origin: str | None) -> bool:
    """With auth off, whether a WebSocket handshake with this ``Origin`` header may go on.

    Auth off means every listener is for this machine only. A browser on this machine runs
    pages from any site, and a WebSocket, unlike a fetch, is not held back by CORS: any page
    could publish into an open fleet through ``ws://127.0.0.1:9001``. So, without auth, only
    clients that are not browsers (no Origin) and pages served from this machine (a loopback
    host) get in; ``null`` (a file, or a sandboxed frame of any site) does not. With auth on
    every origin may try: MQTT carries no cookie, so a page needs a token of its own."""
    if origin is None:
        return True
    host = urlsplit(origin.strip()).hostname
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class AccessCounters:
    """What the embedded broker refused or cut, for ``/metrics``."""

    logins_accepted: int = 0
    logins_refused: Counter[str] = field(default_factory=Counter)
    logins_delayed: int = 0
    """Refusals answered after the back-off delay."""
    publishes_refused: int = 0
    subscriptions_refused: int = 0
    connections_revoked: int = 0
    """Live connections closed because their login credential stopped working."""
    sessions_discarded: int = 0
    """Persistent sessions dropped: credential ended, or a new owner for the client id."""
    connections_cut: int = 0
    """Connections of flooding nodes closed (their logins refused for a while)."""
    publishes_rate_limited: int = 0
    """Publishes of an API key past --key-rate, dropped."""
    queue_dropped: int = 0
    """Messages dropped from a full offline queue (the oldest one goes)."""


@dataclass(frozen=True, slots=True)
class Login:
    """What a CONNECT presents."""

    address: str
    client_id: str
    username: str | None
    password: str | None
    will_topic: str | None


@dataclass(frozen=True, slots=True)
class Admitted:
    principal: Principal
    credential_id: str | None
    """The credential logged in with; None for the manager (its secret never ends)."""

    @property
    def owner(self) -> str:
        """The identity a persistent session belongs to."""
        return f"{self.principal.kind}:{self.principal.id}"


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str
    code: int


class BrokerAccess:
    def __init__(self, auth: AuthService, rules: TopicRules, manager_secret: str,
                 monotonic: Callable[[], float], *, key_rate: float = 1000.0,
                 key_burst: int = 2000) -> None:
        """``key_rate``/``key_burst``: what one API key may publish a second (the broker is
        the one place that knows which key sent a message)."""
        if len(manager_secret) < 32:
            raise ValueError("the manager's broker secret must have at least 32 characters")
        self.auth = auth
        self.rules = rules
        self._secret = manager_secret.encode()
        self._monotonic = monotonic
        self.counters = AccessCounters()
        self._cut_until: dict[str, float] = {}
        """Identities cut off (a flooding node) until that monotonic moment."""
        self._key_rates = KeyedLimiter(key_rate, key_burst)
        self._sent: dict[str, tuple[float, int, int]] = {}
        """Per node identity: (start of its current 10 s window, publishes in it, publishes in
        the window before): who really sent a flood the manager saw on a node's topics."""

    def sent_recently(self, identity: str) -> int:
        """Publishes of that identity in its last 10 to 20 seconds."""
        start, count, before = self._sent.get(identity, (0.0, 0, 0))
        age = self._monotonic() - start
        if age < SENT_WINDOW_S:
            return count + before
        return count if age < 2 * SENT_WINDOW_S else 0

    def cut_off(self, identity: str, seconds: float) -> None:
        """Refuse the identity's logins for ``seconds`` (the caller closes its connection)."""
        now = self._monotonic()
        self._cut_until = {i: t for i, t in self._cut_until.items() if t > now}
        self._cut_until[identity] = now + seconds

    def check(self, login: Login) -> Admitted | Refused:
        """Authenticate a CONNECT: the password is a token whose identity is both the username
        and the client id (or the manager's secret), and the will is the client's own."""
        decided = self._authenticate(login)
        if isinstance(decided, Admitted) and login.will_topic is not None and \
                not self.rules.will_allowed(decided.principal, login.will_topic):
            decided = Refused("will", NOT_AUTHORISED)
        if isinstance(decided, Admitted) and self._cut_until.get(
                decided.principal.broker_identity or "", 0.0) > self._monotonic():
            decided = Refused("cut_off", NOT_AUTHORISED)
        if isinstance(decided, Refused):
            self.counters.logins_refused[decided.reason] += 1
            _limited.warning("broker_login", self._monotonic(),
                             "broker_login_refused address=%s reason=%s client_id=%.64r",
                             login.address, decided.reason, login.client_id)
        else:
            self.counters.logins_accepted += 1
        return decided

    def _authenticate(self, login: Login) -> Admitted | Refused:
        username = login.username
        if username is not None and username.startswith(MANAGER_CLIENT_PREFIX):
            return self._manager_login(login)
        decided = self.auth.broker_login(self.rules, username, login.password, login.client_id)
        if isinstance(decided, str):
            # A token that does not work is a bad password; a working one used beyond its
            # rights (another identity, a role without broker rights) is not authorised.
            refused_as = NOT_AUTHORISED if decided in _BEYOND_RIGHTS else BAD_USERNAME_OR_PASSWORD
            return Refused(decided, refused_as)
        principal, cred = decided
        return Admitted(principal, cred.id)

    def _manager_login(self, login: Login) -> Admitted | Refused:
        secret = (login.password or "").encode("utf-8", "surrogatepass")
        if login.username != MANAGER_USERNAME or not hmac.compare_digest(secret, self._secret):
            return Refused("manager", BAD_USERNAME_OR_PASSWORD)
        principal = Principal("manager", login.client_id)
        if not self.rules.client_id_allowed(principal, login.client_id):
            return Refused("client_id", NOT_AUTHORISED)
        return Admitted(principal, None)

    def still_valid(self, admitted: Admitted) -> bool:
        return admitted.credential_id is None or self.auth.valid(admitted.credential_id)

    def may_publish(self, admitted: Admitted, topic: str) -> bool:
        if self.rules.publish_allowed(admitted.principal, topic):
            return self._within_rate(admitted.principal)
        self.counters.publishes_refused += 1
        _limited.warning("broker_publish", self._monotonic(),
                         "broker_publish_refused identity=%s topic=%.64r", admitted.owner, topic)
        return False

    def _within_rate(self, principal: Principal) -> bool:
        now = self._monotonic()
        if principal.kind == "node":
            start, count, before = self._sent.get(principal.id, (now, 0, 0))
            if now - start >= SENT_WINDOW_S:
                before = count if now - start < 2 * SENT_WINDOW_S else 0
                start, count = now, 0
            elif principal.id not in self._sent and len(self._sent) >= MAX_TRACKED:
                self._sent = {i: v for i, v in self._sent.items()
                              if now - v[0] < 2 * SENT_WINDOW_S}
            self._sent[principal.id] = (start, count + 1, before)
            return True  # a node's rate is the manager's to judge, by topic, on every broker
        if principal.kind == "key" and self._key_rates.take(principal.id, now) > 0:
            self.counters.publishes_rate_limited += 1
            _limited.warning("broker_key_rate", now, "broker_publish_rate_limited key=%s",
                             principal.id)
            return False
        return True

    def may_subscribe(self, admitted: Admitted, filter: str) -> bool:
        if self.rules.subscribe_allowed(admitted.principal, filter):
            return True
        self.counters.subscriptions_refused += 1
        _limited.warning("broker_subscribe", self._monotonic(),
                         "broker_subscribe_refused identity=%s filter=%.64r", admitted.owner,
                         filter)
        return False
