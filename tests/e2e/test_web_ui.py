"""The web UI against a live 3-peer mesh, in Debian's chromium via Playwright.

Every page loads without a console error, Run detail shows events as they
arrive, Diagnostics follows a peer's kill -9 and return, and a mesh with an
API token asks for it. Screenshots land in test-artifacts/ui/ for a person
to look at.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from support import MakeMesh, eventually

from raftmesh.mesh.auth import token_digest
from raftmesh.mesh.client import MeshClient
from raftmesh.mesh.devmesh import DevMesh

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
TOKEN = "ui-test-token-5d1e"
# probe_wait (tests/e2e/probe_agents.py) waits for signals
PROBES = {"PYTHONPATH": str(Path(__file__).resolve().parent), "MESH_AGENT_MODULES": "probe_agents"}


def _prepare() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: run scripts/test.sh, or apt-get install -y chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    _prepare()
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        await browser.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(make_module_mesh: MakeMesh) -> DevMesh:
    return await make_module_mesh("postgres", 3, env=PROBES)


class Page:
    """A browser tab that records every console error and uncaught exception."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest_asyncio.fixture(loop_scope="module")
async def tab(browser: Any) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = Page(await context.new_page())
    yield page
    await context.close()


async def test_every_page_loads_without_console_errors(mesh: DevMesh, tab: Page) -> None:
    url = mesh.url("peer-1")
    async with MeshClient(url) as client:
        done = await client.submit("steps", {"steps": 3, "step_seconds": 0.05}, tenant="acme")
        await client.wait(done["id"], timeout_s=30)
        await client.submit("fail", {})
    page = tab.page

    await page.goto(f"{url}/ui/#/overview")
    await page.locator("td", has_text="peer-3").first.wait_for()
    await page.locator(".kv b").first.wait_for()
    assert await page.locator("table >> text=(leader)").count() == 1
    await tab.shot("overview")

    await page.goto(f"{url}/ui/#/runs?tenant=acme")
    await page.locator(f"a[href='#/run/{done['id']}']").wait_for()
    rows = await page.locator("tbody tr").all_inner_texts()
    assert rows and all("acme" in r for r in rows), rows
    await tab.shot("runs-filtered")

    await page.goto(f"{url}/ui/#/run/{done['id']}")
    await page.get_by_text("Step journal").wait_for()
    await page.get_by_role("cell", name="step-2", exact=True).wait_for()
    await tab.shot("run-detail-finished")

    await page.goto(f"{url}/ui/#/diagnostics")
    await page.locator("tr[data-check='quorum'][data-status='pass']").wait_for()
    # Leader or follower, a peer knows clock skew from heartbeats (the
    # follower its own, from the leader's acknowledgement).
    await page.locator("tr[data-check='clock_skew'][data-status='pass']").wait_for()
    await tab.shot("diagnostics")
    async with MeshClient(url) as client:
        leader = (await client.cluster())["leader"]
    follower = next(p.id for p in mesh.peers if p.id != leader)
    await page.goto(f"{mesh.url(follower)}/ui/#/diagnostics")
    skew = page.locator("tr[data-check='clock_skew'][data-status='pass']")
    await skew.wait_for()
    assert f"against the leader, {leader}" in await skew.inner_text()
    assert tab.errors == []


async def test_run_detail_shows_events_arriving_live(mesh: DevMesh, tab: Page) -> None:
    url = mesh.url("peer-2")
    async with MeshClient(url) as client:
        run = await client.submit("steps", {"steps": 16, "step_seconds": 0.4})
        page = tab.page
        await page.goto(f"{url}/ui/#/run/{run['id']}")
        events = page.locator("#events tbody tr")
        await page.locator(".live").wait_for(timeout=10_000)
        await events.first.wait_for(timeout=15_000)
        first = await events.count()
        still = await client.get_run(run["id"])
        assert still["status"] == "running", "the run ended before live events could be seen"

        async def more() -> int | None:
            n = await events.count()
            return n if n >= first + 3 else None

        later = await eventually(more, 10, "more events on the open page", poll_s=0.2)
        assert later > first
        await tab.shot("run-detail-live")
        await client.wait(run["id"], timeout_s=30)
    await page.locator("text=ended").wait_for(timeout=10_000)
    assert await events.count() == 16
    owners = await page.locator("table").first.inner_text()
    assert "peer-" in owners
    assert tab.errors == []


async def test_diagnostics_follow_a_peer_killed_and_back(mesh: DevMesh, tab: Page) -> None:
    url = mesh.url("peer-1")
    page = tab.page
    async with MeshClient(url) as client:
        ids = [
            (await client.submit("steps", {"steps": 12, "step_seconds": 0.3}))["id"]
            for _ in range(6)
        ]

        async def on_peer_3_with_a_step() -> str | None:
            for run_id in ids:
                run = await client.get_run(run_id)
                if run["owner"] == "peer-3" and run["status"] == "running":
                    if (await client.steps(run_id))["steps"]:
                        return run_id
            return None

        moved = await eventually(on_peer_3_with_a_step, 15, "a run on peer-3 with a checkpoint")
        await page.goto(f"{url}/ui/#/overview")
        await page.locator("td", has_text="peer-3").first.wait_for()
        busy = page.locator(".kv div", has_text="slots used / offered").locator("b")

        async def slots_in_use() -> bool:
            return not (await busy.inner_text()).startswith("0 ")

        await eventually(slots_in_use, 10, "the Overview to show slots in use", poll_s=0.2)
        await tab.shot("overview-busy")
        await page.goto(f"{url}/ui/#/diagnostics")
        row = "tr[data-check='liveness:peer-3']"
        await page.locator(f"{row}[data-status='pass']").wait_for(timeout=10_000)

        mesh.kill("peer-3")
        killed = time.monotonic()
        await page.locator(f"{row}[data-status='fail']").wait_for(timeout=20_000)
        took = time.monotonic() - killed
        await tab.shot("diagnostics-peer-down")
        assert took < 15, f"liveness turned to fail only after {took:.1f} s"
        assert await page.locator("#overall").inner_text() == "FAIL"

        mesh.restart("peer-3")
        await mesh.wait_ready(timeout_s=60, peer_ids=["peer-3"])
        await page.locator(f"{row}[data-status='pass']").wait_for(timeout=20_000)
        churn = await page.locator("tr[data-check='lease_churn']").inner_text()
        assert "peer-3" in churn
        await tab.shot("diagnostics-peer-back")

        # The run that was on peer-3 shows both owners, each under its epoch.
        await client.wait(moved, timeout_s=60)
        await page.goto(f"{url}/ui/#/run/{moved}")
        owners = page.locator("section").first.locator("table").first.locator("tbody tr")
        await page.get_by_role("cell", name="step-11", exact=True).wait_for(timeout=10_000)
        rows = await owners.all_inner_texts()
        assert len(rows) >= 2, rows
        assert "peer-3" in rows[0] and rows[0].split()[0] == "1", rows
        assert "peer-3" not in rows[-1] and int(rows[-1].split()[0]) >= 2, rows
        await tab.shot("run-detail-after-failover")
    assert tab.errors == []


async def test_cancel_and_retry_buttons(mesh: DevMesh, tab: Page) -> None:
    url = mesh.url("peer-2")
    page = tab.page
    async with MeshClient(url) as client:
        sleeper = await client.submit("sleep", {"seconds": 60})
        await page.goto(f"{url}/ui/#/run/{sleeper['id']}")
        await page.get_by_role("button", name="cancel").click()
        await page.locator("h2 >> text=cancelled").wait_for(timeout=15_000)
        assert await page.get_by_role("button", name="cancel").count() == 0

        failed = await client.submit("fail", {})
        await client.wait(failed["id"], timeout_s=30)
        await page.goto(f"{url}/ui/#/run/{failed['id']}")
        await page.locator("pre.bad").wait_for()
        await tab.shot("run-detail-failed")
        await page.get_by_role("button", name="retry").click()

        async def retried() -> bool:
            return (await client.get_run(failed["id"]))["attempts"] >= 2

        await eventually(retried, 20, "the retried run to run again")
    assert tab.errors == []


async def test_pause_resume_and_signal_buttons(mesh: DevMesh, tab: Page, tmp_path: Path) -> None:
    url = mesh.url("peer-3")
    page = tab.page
    run_view = page.locator("h2").first
    async with MeshClient(url) as client:
        # A running run: paused at a step boundary, then resumed.
        busy = await client.submit("steps", {"steps": 30, "step_seconds": 0.3})
        await page.goto(f"{url}/ui/#/run/{busy['id']}")
        await page.locator("h2 >> text=running").wait_for(timeout=15_000)
        await page.get_by_role("button", name="pause").click()
        await page.locator("h2 .paused").wait_for(timeout=15_000)
        assert await page.get_by_role("button", name="pause").count() == 0
        run = await client.get_run(busy["id"])
        assert (run["status"], run["owner"]) == ("paused", None), run
        await tab.shot("run-detail-paused")
        await page.get_by_role("button", name="resume").click()

        async def going_again() -> bool:
            return (await client.get_run(busy["id"]))["status"] in ("queued", "running")

        await eventually(going_again, 15, "the resumed run back in the queue or running")
        await page.get_by_role("button", name="pause").wait_for(timeout=10_000)
        await client.cancel(busy["id"])

        # A waiting run: what it waits for is shown, and a signal from the form ends it.
        waits = {"log": str(tmp_path / "witness.log"), "waits": [{"signal": "go"}]}
        waiter = await client.submit("probe_wait", waits)
        await page.goto(f"{url}/ui/#/run/{waiter['id']}")
        await page.locator("h2 .waiting").wait_for(timeout=30_000)
        await page.locator(".kv b", has_text="signal 'go'").wait_for(timeout=5_000)
        form = page.locator("#signal-form")
        await form.locator("input[name=signal-name]").fill("go")
        await form.locator("input[name=signal-data]").fill("{bad")
        await form.get_by_role("button", name="send signal").click()
        await page.locator("#signal-note.error", has_text="not valid JSON").wait_for()
        assert (await client.get_run(waiter["id"]))["status"] == "waiting", "nothing was sent"
        await form.locator("input[name=signal-data]").fill('{"n": 7}')
        await form.get_by_role("button", name="send signal").click()
        await page.locator("#signal-note", has_text="signal go sent (seq 0)").wait_for()
        await tab.shot("run-detail-signalled")
        done = await client.wait(waiter["id"], timeout_s=30)
        assert done["result"] == {"got": [{"n": 7}]}, done
        await page.locator("pre", has_text='"n": 7').wait_for(timeout=10_000)
        assert await form.is_hidden(), "an ended run takes no signal"
        assert "succeeded" in await run_view.inner_text()
    assert tab.errors == []


async def test_token_prompt_when_the_api_wants_a_token(
    make_module_mesh: MakeMesh, browser: Any
) -> None:
    secured = await make_module_mesh("postgres", 3, env={"MESH_API_TOKEN": TOKEN})
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        tab = Page(await context.new_page())
        page = tab.page
        await page.goto(f"{secured.url('peer-1')}/ui/#/overview")
        dialog = page.locator("#token-dialog")
        await dialog.wait_for(state="visible")
        await tab.shot("token-prompt")
        await page.fill("#token-input", TOKEN)
        await page.click("#token-form button[type=submit]")
        await page.locator("td", has_text="peer-3").first.wait_for(timeout=10_000)
        assert await dialog.is_visible() is False
        assert await page.evaluate("sessionStorage.getItem('raftmesh-api-token')") == TOKEN
        assert TOKEN not in page.url
        await page.goto(f"{secured.url('peer-2')}/ui/#/diagnostics")
        # Another peer is another origin: it asks again, and nothing leaked into a URL.
        await dialog.wait_for(state="visible")
        await page.fill("#token-input", TOKEN)
        await page.click("#token-form button[type=submit]")
        await page.locator("tr[data-check='quorum']").wait_for(timeout=10_000)
        await tab.shot("token-accepted-diagnostics")
        assert tab.errors == []
    finally:
        await context.close()


async def test_a_tenant_token_sees_its_runs_and_is_not_shown_the_admin_pages(
    make_module_mesh: MakeMesh, browser: Any, tmp_path: Path
) -> None:
    """A tenant's token lands on Runs and sees only its tenant's runs; the
    Overview and Diagnostics say they need an admin token instead of asking
    the API (which answers 403): no console error anywhere."""
    admin, tenant = "ui-admin-token-90c1", "ui-acme-token-47e2"
    tokens = tmp_path / "api_tokens.toml"
    tokens.write_text(
        f'[[token]]\nsha256 = "{token_digest(admin)}"\nadmin = true\n\n'
        f'[[token]]\nsha256 = "{token_digest(tenant)}"\ntenant = "acme"\nadmin = false\n'
    )
    secured = await make_module_mesh("postgres", 1, env={"MESH_API_TOKENS_FILE": str(tokens)})
    url = secured.url("peer-1")
    async with MeshClient(url, admin) as client:
        mine = (await client.submit("echo", {"who": "acme"}, tenant="acme"))["id"]
        theirs = (await client.submit("echo", {"who": "other"}, tenant="other"))["id"]
        await client.wait(mine, timeout_s=30)
        await client.wait(theirs, timeout_s=30)
    async with aiohttp.ClientSession() as http:
        for presented, expected in (
            (admin, (200, {"admin": True, "tenant": None})),
            (tenant, (200, {"admin": False, "tenant": "acme"})),
        ):
            headers = {"Authorization": f"Bearer {presented}"}
            async with http.get(f"{url}/v1/whoami", headers=headers) as resp:
                assert (resp.status, await resp.json()) == expected
        async with http.get(f"{url}/v1/whoami", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401

    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        tab = Page(await context.new_page())
        page = tab.page
        await page.goto(f"{url}/ui/")
        await page.locator("#token-dialog").wait_for(state="visible")
        await page.fill("#token-input", tenant)
        await page.click("#token-form button[type=submit]")
        await page.locator(f"a[href='#/run/{mine}']").wait_for(timeout=10_000)
        assert page.url.endswith("#/runs")
        assert await page.locator(f"a[href='#/run/{theirs}']").count() == 0
        assert "tenant acme" in await page.locator("#auth").inner_text()
        await tab.shot("tenant-runs")
        await page.click(f"a[href='#/run/{mine}']")
        await page.locator("#view", has_text="succeeded").wait_for(timeout=10_000)
        for name in ("overview", "diagnostics"):
            await page.goto(f"{url}/ui/#/{name}")
            notice = page.locator("section.admin-only")
            await notice.wait_for(timeout=10_000)
            assert "needs an admin token" in await notice.inner_text()
            assert "acme" in await notice.inner_text()
        await tab.shot("tenant-admin-page")
        assert tab.errors == []
    finally:
        await context.close()
