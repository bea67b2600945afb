"""Tokens, key ids, durations and bearer headers (contract section 8, "Tokens")."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetmq.auth.tokens import (
    KINDS,
    MAX_TOKEN_LENGTH,
    bearer_token,
    digest,
    new_key_id,
    new_token,
    parse_duration,
    token_kind,
)
from fleetmq.core.topics import is_valid_node_id

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# --- tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_new_token_is_prefix_and_43_base64url_characters(kind: str) -> None:
    token = new_token(kind)

    assert re.fullmatch(rf"fmq_{kind}_[A-Za-z0-9_-]{{43}}", token)
    assert len(token) <= MAX_TOKEN_LENGTH <= 64
    assert token_kind(token) == kind


def test_new_tokens_differ() -> None:
    assert len({new_token("node") for _ in range(100)}) == 100


def test_new_token_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown token kind 'admin'"):
        new_token("admin")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fmq_key_",
        "fmq_adm_" + "A" * 43,                  # unknown kind
        "FMQ_key_" + "A" * 43,                  # prefix is case-sensitive
        "fmq_key_" + "A" * 42,                  # too short
        "fmq_key_" + "A" * 44,                  # too long
        "fmq_key_" + "A" * 42 + "B",            # last character cannot end 32 bytes
        "fmq_key_" + "A" * 41 + "=" + "A",      # padding is not base64url
        "fmq_key_" + "A" * 41 + "+" + "A",      # standard base64, not base64url
        "fmq_key_" + "A" * 41 + "\0" + "A",
        "fmq_key_" + "A" * 41 + "é" + "A",
        "fmq_key_" + "A" * 41 + "٣" + "A",      # a non-ASCII digit
        " fmq_key_" + "A" * 43,
        "fmq_key_" + "A" * 43 + "\n",
        "fmq_key_" + "A" * 10_000,
        "\ud800" * 51,                          # lone surrogates, as a decoded header may hold
    ],
)
def test_token_kind_refuses_malformed_text(text: str) -> None:
    assert token_kind(text) is None


def test_digest_is_sha256_of_the_utf8_token() -> None:
    token = new_token("key")

    assert digest(token) == hashlib.sha256(token.encode()).digest()


def test_digest_of_malformed_text_does_not_raise() -> None:
    assert len(digest("\ud800 not a token")) == 32


def test_key_id_is_12_lowercase_hex_and_never_a_node_id_behind_its_prefix() -> None:
    key_id = new_key_id()

    assert re.fullmatch(r"[0-9a-f]{12}", key_id)
    assert not is_valid_node_id(f"_key.{key_id}")


@given(st.sampled_from(KINDS))
def test_token_kind_accepts_every_new_token(kind: str) -> None:
    assert token_kind(new_token(kind)) == kind


@given(st.text(max_size=80))
def test_token_kind_never_raises_and_refuses_random_text(text: str) -> None:
    # Random text this short is a well-formed token with negligible probability.
    assert token_kind(text) is None


@given(st.sampled_from(KINDS), st.integers(min_value=1, max_value=60))
def test_a_truncated_token_is_refused(kind: str, cut: int) -> None:
    token = new_token(kind)

    assert token_kind(token[: max(0, len(token) - cut)]) is None


@given(st.sampled_from(KINDS), st.text(min_size=1, max_size=20))
def test_an_extended_token_is_refused(kind: str, tail: str) -> None:
    token = new_token(kind)

    assert token_kind(token + tail) is None
    assert token_kind(tail + token) is None


@given(st.sampled_from(KINDS), st.data())
def test_a_token_with_one_character_out_of_its_alphabet_is_refused(
    kind: str, data: st.DataObject
) -> None:
    token = new_token(kind)
    prefix = len(f"fmq_{kind}_")
    position = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    if position < prefix:
        # No kind is one character away from another, so any change to the prefix breaks it.
        char = data.draw(st.characters().filter(lambda c: c != token[position]))
    else:
        char = data.draw(st.characters().filter(lambda c: c not in ALPHABET))
    altered = token[:position] + char + token[position + 1 :]

    assert token_kind(altered) is None


# --- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("90m", 5400.0), ("12h", 43200.0), ("30d", 2_592_000.0),
     ("1.5h", 5400.0), ("0.5", 0.5), (" 30d ", 2_592_000.0), ("36500d", 3_153_600_000.0)],
)
def test_parse_duration_reads_seconds_and_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "0", "0d", "-5", "-5m", "nan", "inf", "1e3", "5w", "5 m", "m", "1_000", "5M", "٣",
     "36600d", "9" * 100, ".5", "5.", "90mm"],
)
def test_parse_duration_refuses_anything_else_naming_the_value_and_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as caught:
        parse_duration(text)

    assert repr(text[:64]) in str(caught.value)
    assert "s, m, h or d" in str(caught.value)


@given(st.text(max_size=30))
def test_parse_duration_returns_a_positive_bounded_number_or_raises_value_error(
    text: str,
) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert 0 < seconds <= 100 * 365.25 * 86400


# --- bearer header -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_token_takes_the_token_after_the_scheme_in_any_case(scheme: str) -> None:
    assert bearer_token(f"{scheme} fmq_key_abc") == "fmq_key_abc"


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Bearer  tok", "Bearer tok extra", "Bearer tok\t",
     "Basic dXNlcjpwYXNz", "Token tok", "Bearertok", "Bearer\ttok", "tok"],
)
def test_bearer_token_refuses_any_other_header(header: str | None) -> None:
    assert bearer_token(header) is None


_no_space = st.text(min_size=1, max_size=60).filter(lambda t: not any(c.isspace() for c in t))


@given(_no_space, st.sampled_from(["Bearer", "bearer", "BEARER"]))
def test_bearer_token_returns_any_token_without_whitespace_as_it_is(token: str,
                                                                    scheme: str) -> None:
    assert bearer_token(f"{scheme} {token}") == token


@given(st.one_of(st.text(max_size=80), st.builds("Bearer {}".format, st.text(max_size=60))))
def test_bearer_token_returns_none_or_the_one_word_after_the_scheme(header: str) -> None:
    token = bearer_token(header)
    if token is not None:
        assert token
        assert not any(c.isspace() for c in token)
        assert header.lower() == f"bearer {token}".lower()
