"""Texts that many nodes repeat, kept once: a fleet of one model in one place registers the
same type, location, capabilities and often metadata, and each registration parses its own
copy (about 230 bytes a node for the contract's example registration)."""

from __future__ import annotations

SHARED_TEXTS = 65_536
"""How many distinct descriptive texts are remembered for sharing (then forgotten at once)."""


class SharedTexts:
    """One copy of a text many nodes repeat (a type, a location, the same capabilities or
    metadata: a fleet of one model in one place), where each registration parsed its own.
    Bounded: when full it starts over, so distinct texts cost nothing lasting (at worst a
    shared text is kept once per fill, not once per node)."""

    __slots__ = ("_texts",)

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        texts = self._texts
        kept = texts.get(text)
        if kept is not None:
            return kept
        if len(texts) >= SHARED_TEXTS:
            texts.clear()
        texts[text] = text
        return text

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self(text)
