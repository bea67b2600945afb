"""``fleetmq serve --loop``: which event loop the manager runs on."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from fleetmq.cli import loop_factory, loop_name
from fleetmq.errors import ConfigError

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def _ran_on(choice: str) -> str:
    async def name() -> str:
        return loop_name(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(name())


def test_asyncio_is_asyncios_own_loop() -> None:
    assert _ran_on("asyncio") == "asyncio"
    assert _ran_on(" AsyncIO ") == "asyncio"


def test_auto_is_uvloop_when_installed() -> None:
    assert _ran_on("auto") == ("uvloop" if HAVE_UVLOOP else "asyncio")


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed (fleetmq[fast])")
def test_uvloop_when_asked() -> None:
    assert _ran_on("uvloop") == "uvloop"


def test_without_uvloop_auto_falls_back_and_uvloop_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert _ran_on("auto") == "asyncio"
    with pytest.raises(ConfigError, match=r"fleetmq\[fast\]"):
        loop_factory("uvloop")


def test_an_unknown_loop_is_refused_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="--loop"):
        loop_factory("trio")
