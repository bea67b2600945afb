"""Broker password hashes of tokens, made when a token is made (the token is never kept).

Mosquitto 2.0's password file format: ``$7$<iterations>$<salt>$<hash>``, PBKDF2-HMAC-SHA512
with a 12-byte salt, both base64. fleetmq's tokens are 256-bit random, so the iteration count
guards nothing that the token's entropy does not already: Mosquitto's default is kept.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

MOSQUITTO_ITERATIONS = 101
MOSQUITTO_SALT_BYTES = 12


def mosquitto_hash(token: str) -> str:
    salt = secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    derived = hashlib.pbkdf2_hmac("sha512", token.encode(), salt, MOSQUITTO_ITERATIONS)
    return (f"$7${MOSQUITTO_ITERATIONS}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(derived).decode()}")
