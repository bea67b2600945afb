"""Fixtures of the dashboard's browser tests: Debian's Chromium driven by Playwright.

Playwright's own browser download is not used (nor reachable in CI): the tests launch the
machine's ``/usr/bin/chromium``. ``.ci/run`` installs it and sets FLEETMQ_REQUIRE_BROWSER, so
there a missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("FLEETMQ_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FLEETMQ_ARTIFACTS", Path(__file__).resolve().parents[2]
                                / "test-artifacts"))
"""Screenshots the tests take, for a person to look at (not committed: .gitignore)."""


def _require_browser() -> None:
    missing = [what for what, ok in (
        (CHROMIUM, shutil.which(CHROMIUM) is not None),
        ("playwright (pip)", _importable("playwright.async_api")),
    ) if not ok]
    if missing:
        message = f"browser tests need {' and '.join(missing)}"
        if os.environ.get("FLEETMQ_REQUIRE_BROWSER"):
            pytest.fail(f"{message}, and FLEETMQ_REQUIRE_BROWSER is set")
        pytest.skip(f"{message} (apt-get install chromium; pip install -e '.[test]')")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@dataclass
class Tab:
    """A page, and what it said: console errors, uncaught exceptions and dialogs."""

    page: Any
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    _require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def tab(browser: Any) -> AsyncIterator[Tab]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    seen = Tab(page)
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.errors.append(f"uncaught: {e}"))

    async def on_dialog(dialog: Any) -> None:
        seen.dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.set_default_timeout(10_000)
    try:
        yield seen
    finally:
        await context.close()


async def screenshot(tab: Tab, name: str) -> Path:
    """Saved for a person to look at; the page makes the folder (Playwright does)."""
    path = ARTIFACTS / f"{name}.png"
    await tab.page.screenshot(path=str(path), full_page=True)
    return path
