"""The dashboard in a real browser (contract section 9): Debian's Chromium driven by
Playwright, against a running manager with a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.browser.conftest import Tab, screenshot
from tests.conftest import MqttClient, eventually, make_settings, running
from tests.security.conftest import auth_settings
from tests.support import Mosquitto

FLEET = "/api/v1/fleet"
EVIL_NAME = "<img src=x onerror=alert(1)>"
EVIL_LOCATION = "<script>alert(2)</script>"
EVIL_METADATA = {"note": "<b onmouseover=alert(3)>bold</b>", "html": "<iframe src=/>"}
FLEET_TYPES = ("microclaw", "picclaw", "nanoclaw")
EN_DASH = "\u2013"  # the page's ranges ("1-50") and its "no count yet" use it
NO_COUNT = EN_DASH


async def register_all(http: aiohttp.ClientSession, base: str, bodies: list[dict[str, Any]],
                       token: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def one(body: dict[str, Any]) -> None:
        async with http.post(f"{base}{FLEET}/register", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()

    for start in range(0, len(bodies), 100):
        await asyncio.gather(*(one(body) for body in bodies[start:start + 100]))


def fleet_of(n: int) -> list[dict[str, Any]]:
    return [{"node_id": f"node-{i:04d}", "node_type": FLEET_TYPES[i % 3],
             "location": f"floor-{i % 4}", "metadata": {"fw": f"1.{i % 7}"}}
            for i in range(n)]


async def get_json(http: aiohttp.ClientSession, url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def counts_by_rest(http: aiohttp.ClientSession, base: str) -> dict[str, int]:
    """Each count from a filtered list's total: independent of the summary route."""
    counts = {"total": (await get_json(http, f"{base}{FLEET}/nodes?limit=1"))["total"]}
    for status in ("online", "degraded", "offline"):
        page = await get_json(http, f"{base}{FLEET}/nodes?limit=1&status={status}")
        counts[status] = page["total"]
    return counts


async def shown_counts(tab: Tab) -> dict[str, int]:
    counts = {}
    for name in ("total", "online", "degraded", "offline"):
        text = await tab.page.text_content(f"#count-{name}")
        counts[name] = int((text or "").replace(",", "")) if (text or "").strip(NO_COUNT) else -1
    return counts


async def table_ids(tab: Tab) -> list[str]:
    return await tab.page.eval_on_selector_all("#nodes tbody td.id",  # type: ignore[no-any-return]
                                               "cells => cells.map(c => c.textContent)")


async def test_the_page_shows_the_fleet_and_its_counts_equal_rest_s(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tab: Tab
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        await register_all(http, base, fleet_of(1_000))
        for i in range(0, 30, 3):
            await http.post(f"{base}{FLEET}/heartbeat",
                            json={"node_id": f"node-{i:04d}", "status": "degraded",
                                  "reason": "low_battery"})
        for i in range(1, 30, 3):
            await http.post(f"{base}{FLEET}/heartbeat",
                            json={"node_id": f"node-{i:04d}", "status": "offline"})

        response = await tab.page.goto(base + "/")
        assert response.status == 200
        assert response.headers["content-security-policy"] == \
            "default-src 'self'; frame-ancestors 'none'"
        assert response.headers["x-content-type-options"] == "nosniff"
        expected = await counts_by_rest(http, base)
        assert expected == {"total": 1_000, "online": 980, "degraded": 10, "offline": 10}
        await eventually(lambda: _equal(tab, expected))
        assert await table_ids(tab) == [f"node-{i:04d}" for i in range(50)]
        assert await tab.page.text_content("#page-info") == f"1{EN_DASH}50 of 1,000"
        await tab.page.click("#next-page")
        await eventually(lambda: _first_id(tab, "node-0050"))
        types = await tab.page.eval_on_selector_all(
            "#types button", "bs => bs.map(b => b.dataset.type)")
        assert sorted(types) == sorted(FLEET_TYPES)
        shot = await screenshot(tab, "dashboard-fleet")
        assert shot.stat().st_size > 10_000
        assert tab.errors == []


async def _equal(tab: Tab, expected: dict[str, int]) -> bool:
    return await shown_counts(tab) == expected


async def _first_id(tab: Tab, node_id: str) -> bool:
    ids = await table_ids(tab)
    return bool(ids) and ids[0] == node_id


async def _row_status(tab: Tab, node_id: str) -> str | None:
    return await tab.page.evaluate(  # type: ignore[no-any-return]
        """id => {
             const row = [...document.querySelectorAll('#nodes tbody tr')]
               .find(r => r.dataset.id === id);
             return row ? row.querySelector('.status-cell').textContent : null;
           }""", node_id)


async def test_a_node_that_goes_offline_changes_on_the_page_within_2_s_without_a_reload(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tab: Tab
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        await register_all(http, base, fleet_of(100))
        agent = MqttClient(mosquitto.port, "aaa-live")  # sorts first: on the first page
        await agent.connect(will=(f"{root}/aaa-live/heartbeat",
                                  b'{"status": "offline", "reason": "connection_lost"}'))
        try:
            await agent.publish(f"{root}/aaa-live/register", b'{"node_type": "picclaw"}')
            await eventually(lambda: _online(http, base, "aaa-live"))
            await tab.page.goto(base + "/")
            await eventually(lambda: _row_is(tab, "aaa-live", "online"))
            await tab.page.evaluate("window.__sameDocument = true")
            await eventually(lambda: _stream_live(tab))

            agent.kill()  # the broker publishes its will: offline, connection_lost
            await eventually(lambda: _row_is(tab, "aaa-live", "offline"), timeout=2.0)
            assert await tab.page.evaluate("window.__sameDocument === true")  # no reload
            # The counts follow from the summary, read again at most once a second.
            await eventually(lambda: _text_is(tab, "#count-offline", "1"), timeout=2.0)
            await screenshot(tab, "dashboard-live-offline")
            # Checked before the manager stops: its shutdown ends the page's stream, which
            # the browser reports as a failed load.
            assert tab.errors == []
        finally:
            agent.close()


async def _online(http: aiohttp.ClientSession, base: str, node_id: str) -> bool:
    async with http.get(f"{base}{FLEET}/nodes/{node_id}") as resp:
        return resp.status == 200 and (await resp.json())["status"] == "online"


async def _row_is(tab: Tab, node_id: str, status: str) -> bool:
    return await _row_status(tab, node_id) == status


async def _stream_live(tab: Tab) -> bool:
    return await tab.page.get_attribute("#stream", "data-state") == "ok"


async def _text(tab: Tab, selector: str) -> str:
    return (await tab.page.text_content(selector)) or ""


async def _text_is(tab: Tab, selector: str, text: str) -> bool:
    return await _text(tab, selector) == text


async def test_search_and_filters_narrow_the_table(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tab: Tab
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        await register_all(http, base, fleet_of(300))
        await http.post(f"{base}{FLEET}/heartbeat",
                        json={"node_id": "node-0102", "status": "degraded", "reason": "hot"})
        await tab.page.goto(base + "/")
        await eventually(lambda: _first_id(tab, "node-0000"))

        await tab.page.fill("#q", "node-01")
        await eventually(lambda: _ids_are(tab, [f"node-{i:04d}" for i in range(100, 150)]))
        assert await _text(tab, "#page-info") == f"1{EN_DASH}50 of 100"

        await tab.page.select_option("#type", "picclaw")
        want = [f"node-{i:04d}" for i in range(100, 200) if i % 3 == 1]
        await eventually(lambda: _ids_are(tab, want))

        await tab.page.fill("#location", "floor-1")
        await eventually(lambda: _ids_are(tab, [i for i in want if int(i[-4:]) % 4 == 1]))

        await tab.page.fill("#location", "")
        await tab.page.select_option("#type", "")
        await tab.page.click(".card.degraded")
        await eventually(lambda: _ids_are(tab, ["node-0102"]))
        assert await _text(tab, "#nodes tbody td.reason") == "hot"

        await tab.page.fill("#q", "nothing-like-it")
        await eventually(lambda: _visible(tab, "#empty"))
        assert tab.errors == []


async def _ids_are(tab: Tab, ids: list[str]) -> bool:
    return await table_ids(tab) == ids


async def _visible(tab: Tab, selector: str) -> bool:
    return await tab.page.is_visible(selector)


async def test_the_node_page_shows_its_fields_telemetry_and_history(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tab: Tab
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        await register_all(http, base, fleet_of(5))
        for body in ({"uptime_seconds": 3_700, "free_memory_kb": 2_048, "sensors_active": 3},
                     {"status": "degraded", "reason": "low_battery"}, {"status": "offline"},
                     {}):
            async with http.post(f"{base}{FLEET}/heartbeat",
                                 json={"node_id": "node-0002", **body}) as resp:
                assert resp.status == 200
        events = (await get_json(http, f"{base}{FLEET}/nodes/node-0002/events"))["events"]

        await tab.page.goto(base + "/")
        await eventually(lambda: _first_id(tab, "node-0000"))
        await tab.page.click("#nodes tbody tr[data-id='node-0002']")
        await tab.page.wait_for_selector("#node-view:not([hidden])")
        await eventually(lambda: _count(tab, "#node-history li", len(events)))
        history = await tab.page.eval_on_selector_all("#node-history li",
                                                      "lis => lis.map(li => li.textContent)")
        for item, event in zip(history, events, strict=True):
            assert event["at"] in item
            assert event["to"] in item
            assert event["reason"] in item
        fields = await _text(tab, "#node-fields")
        assert "nanoclaw" in fields
        assert "floor-2" in fields
        assert "low_battery" not in fields
        telemetry = await _text(tab, "#node-telemetry")
        assert "1h 1m" in telemetry
        assert "2,048 KB" in telemetry
        assert "1.2" in await _text(tab, "#node-metadata")
        await screenshot(tab, "dashboard-node")
        await tab.page.click("a.back")
        await tab.page.wait_for_selector("#fleet-view:not([hidden])")
        assert tab.errors == []


async def _count(tab: Tab, selector: str, n: int) -> bool:
    return len(await tab.page.query_selector_all(selector)) == n


async def test_node_data_that_holds_html_shows_as_text_and_runs_nothing(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tab: Tab
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        await register_all(http, base, [{"node_id": "evil-1", "node_type": "microclaw",
                                         "name": EVIL_NAME, "location": EVIL_LOCATION,
                                         "metadata": EVIL_METADATA}])
        await tab.page.goto(base + "/")
        await eventually(lambda: _first_id(tab, "evil-1"))
        row = await _text(tab, "#nodes tbody tr[data-id='evil-1']")
        assert EVIL_NAME in row
        assert EVIL_LOCATION in row
        await tab.page.click("#nodes tbody tr[data-id='evil-1']")
        await tab.page.wait_for_selector("#node-view:not([hidden])")
        await eventually(lambda: _has_text(tab, "#node-metadata", EVIL_METADATA["note"]))
        assert EVIL_NAME in await _text(tab, "#node-title")
        assert EVIL_LOCATION in await _text(tab, "#node-fields")
        for tag in ("img", "script:not([src])", "iframe", "b"):
            assert await tab.page.query_selector_all(f"main {tag}") == [], tag
        assert tab.dialogs == []  # no alert() ran
        assert tab.errors == []


async def _has_text(tab: Tab, selector: str, text: str) -> bool:
    return text in await _text(tab, selector)


async def test_with_auth_on_the_page_asks_for_a_key_and_warns_of_a_stronger_one(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tab: Tab, tmp_path: Path
) -> None:
    settings = make_settings(mosquitto.url, root, auth=auth_settings(tmp_path))
    async with running(settings) as svc:
        base = f"http://127.0.0.1:{svc.http_port}"
        admin = (tmp_path / "admin.token").read_text().strip()
        await register_all(http, base, fleet_of(3), token=admin)
        async with http.post(f"{base}/api/v1/keys", json={"role": "read", "name": "wall"},
                             headers={"Authorization": f"Bearer {admin}"}) as resp:
            read_key = (await resp.json())["token"]

        await tab.page.goto(base + "/")
        await tab.page.wait_for_selector("#key-dialog[open]")
        assert await table_ids(tab) == []  # nothing shown without a key
        await tab.page.fill("#key-input", "fmq_key_" + "A" * 43)
        await tab.page.click("#key-form button[type=submit]")
        await eventually(lambda: _visible(tab, "#key-error"))
        assert "not valid" in await _text(tab, "#key-error")

        await tab.page.fill("#key-input", read_key)
        await tab.page.click("#key-form button[type=submit]")
        await eventually(lambda: _first_id(tab, "node-0000"))
        await eventually(lambda: _has_text(tab, "#key-role", "read"))
        assert not await tab.page.is_visible("#banner")
        stored = await tab.page.evaluate("sessionStorage.getItem('fleetmq.key')")
        assert stored == read_key
        assert await tab.page.evaluate("localStorage.length") == 0  # this tab only
        await screenshot(tab, "dashboard-key-read")

        # A new tab knows no key; an admin key works but the page says a read key is enough.
        other = await tab.page.context.browser.new_context()
        page = await other.new_page()
        try:
            await page.goto(base + "/")
            await page.wait_for_selector("#key-dialog[open]")
            await page.fill("#key-input", admin)
            await page.click("#key-form button[type=submit]")
            await page.wait_for_selector("#banner:not([hidden])")
            assert "read key is enough" in (await page.text_content("#banner") or "")
            assert "admin" in (await page.text_content("#key-role") or "")
        finally:
            await other.close()
        # 401s of a missing key are the page's own requests, not errors of the page's code.
        assert all("401" in error or "403" in error for error in tab.errors), tab.errors


def test_the_dashboard_files_are_in_the_package() -> None:
    from importlib import resources

    folder = resources.files("fleetmq") / "dashboard"
    names = {entry.name for entry in folder.iterdir()}
    assert {"index.html", "app.js", "app.css", "icon.svg"} <= names
    script = (folder / "app.js").read_text()
    # Node data goes in as text only: no HTML parsing sinks anywhere in the page's code.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    page = (folder / "index.html").read_text()
    assert "http://" not in page
    assert "https://" not in page
