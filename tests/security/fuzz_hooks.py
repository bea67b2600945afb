"""Loaded into ``st run`` by ``test_fuzz_openapi.py`` (``SCHEMATHESIS_HOOKS``): every request
the fuzzer sends comes from a fresh random client address.

The manager under test trusts 127.0.0.1 as its proxy, and each request carries a random
``X-Forwarded-For``. The fuzzer sends thousands of requests without a token or with a wrong
one; from one address the failed-login back-off (contract sections 8 and 11: the 11th failed
attempt in a minute from one address and identity gets 429) would rightly answer 429 to most
of them and leave the 401 paths untested. Many clients, each failing a few times, is what the
back-off must let through.

The header is added to the prepared request rather than in a ``before_call`` hook: a hook
that edits ``case.headers`` makes schemathesis re-classify the case, so a case generated
without the Authorization header would be sent with it.
"""

from __future__ import annotations

import random
from typing import Any

import requests

_addresses = random.Random()
_send = requests.Session.send


def _send_from_a_new_client(self: requests.Session, request: requests.PreparedRequest,
                            **kwargs: Any) -> requests.Response:
    octets = (_addresses.randrange(256), _addresses.randrange(256), _addresses.randrange(1, 255))
    request.headers["X-Forwarded-For"] = "10.{}.{}.{}".format(*octets)
    return _send(self, request, **kwargs)


requests.Session.send = _send_from_a_new_client  # type: ignore[method-assign]
