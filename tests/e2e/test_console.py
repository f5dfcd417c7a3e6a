"""The web console in a real browser: Debian's Chromium, headless, driven by Playwright,
against a real `maas serve` holding a tiny chat model and a year of demo usage.

Set MAAS_CONSOLE_SCREENSHOTS=docs/images to rewrite the console's screenshots in the docs.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from maas.analytics import demo_usage
from maas.config import Settings
from maas.registry import open_registry
from maas.training.demo_data import write_digits_archive
from tests.e2e.conftest import Server, start_digits_training
from tests.fixtures import make_tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling Google's hosts, which this
# machine's closed network refuses; as root it needs --no-sandbox.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = os.environ.get("MAAS_CONSOLE_SCREENSHOTS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    settings = Settings(home=root / "home")
    registry = open_registry(settings)
    try:
        registry.import_model(make_tiny_llama(root / "llama"), "tiny-chat", task="chat")
        start = datetime.now(UTC).date() - timedelta(days=364)
        demo_usage.fill(registry.engine, start=start, industries=3, scale=0.05)
    finally:
        registry.close()
    running = Server(root / "home", env={"MAAS_LLM_COMPILE": "false"})
    try:
        running.wait_ready()
        admin = running.admin
        assert (
            admin.post("/api/v1/tenants", json={"name": "acme", "industry": "retail"}).status_code
            == 201
        )
        made = admin.post("/api/v1/keys", json={"name": "web", "tenant": "acme", "role": "user"})
        running.user_key = made.json()["key"]
        loaded = admin.post("/v2/repository/models/tiny-chat/load", timeout=120)
        assert loaded.status_code == 200, loaded.text
    except BaseException:
        running.stop()
        raise
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: make install-dev installs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def sign_in(page: Page, server, key: str) -> None:
    page.goto(f"{server.url}/ui")
    page.fill("#key", key)
    page.click("#sign-in-form button")


def shoot(page: Page, name: str) -> None:
    if SHOTS:
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)  # the charts' last frame
        page.screenshot(path=str(Path(SHOTS) / f"console-{name}.png"))


def test_a_wrong_key_is_refused_and_not_kept(page, server):
    sign_in(page, server, "maas-aaaaaaaaaaaa_wrong")
    expect(page.locator("#sign-in-error")).to_contain_text("invalid API key")
    assert page.evaluate("sessionStorage.getItem('maas.key')") is None
    if SHOTS:
        page.goto(f"{server.url}/ui")
        shoot(page, "sign-in")


def test_an_admin_signs_in_and_sees_the_models(page, server):
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/ui/models")
    row = page.locator('tr[data-model="tiny-chat"]')
    expect(row).to_contain_text("chat")
    expect(row.locator(".tag.loaded")).to_contain_text("version 1")
    expect(page.locator("#who")).to_contain_text("admin")
    # the key is in this tab's session storage only: not in a cookie, local storage or a URL
    assert page.evaluate("sessionStorage.getItem('maas.key')") == server.admin_key
    assert page.context.cookies() == []
    assert page.evaluate("localStorage.length") == 0
    assert server.admin_key not in page.url
    shoot(page, "models")


PACED_CHAT = """() => {
    // The server's chat stream, passed on to the page an event at a time, 20 ms apart. The
    // tiny model writes its tokens within milliseconds, so the page may read them all in one
    // or two reads and show them at once however it renders a stream (it did so once on
    // CI): paced, each event is a read of its own, as from a model of real size.
    const realFetch = window.fetch.bind(window);
    window.fetch = async (input, init) => {
        const response = await realFetch(input, init);
        if (!String(input).endsWith("/v1/chat/completions") || !response.ok) return response;
        const source = response.body.getReader();
        const decoder = new TextDecoder(), encoder = new TextEncoder();
        let pending = "";
        const paced = new ReadableStream({
            async pull(controller) {
                for (;;) {
                    const blank = /\\r?\\n\\r?\\n/.exec(pending);
                    if (blank) {
                        const event = pending.slice(0, blank.index + blank[0].length);
                        pending = pending.slice(event.length);
                        await new Promise((resolve) => setTimeout(resolve, 20));
                        controller.enqueue(encoder.encode(event));
                        return;
                    }
                    const { value, done } = await source.read();
                    if (done) {
                        if (pending) controller.enqueue(encoder.encode(pending));
                        controller.close();
                        return;
                    }
                    pending += decoder.decode(value, { stream: true });
                }
            },
            cancel(reason) { return source.cancel(reason); },
        });
        return new Response(paced, { status: response.status, headers: response.headers });
    };
}"""


def test_a_chat_streams_into_the_page(page, server):
    sign_in(page, server, server.user_key)
    page.wait_for_url(f"{server.url}/ui/usage")
    page.goto(f"{server.url}/ui/chat")
    page.fill("#chat-input", "Hello there")
    page.fill("#chat-max", "24")
    page.fill("#chat-temperature", "0")
    # count how many times the answer grows while it streams
    page.evaluate(
        """() => {
        window.growths = 0;
        new MutationObserver(() => { window.growths += 1; })
            .observe(document.getElementById('chat-log'),
                     {subtree: true, characterData: true, childList: true});
    }"""
    )
    page.evaluate(PACED_CHAT)
    with page.expect_response(f"{server.url}/v1/chat/completions") as answered:
        page.click("#chat-send")
    response = answered.value
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    answer = page.locator("#chat-log li.assistant[data-done]")
    expect(answer).to_have_count(1)
    assert answer.locator(".content").inner_text().strip()
    assert response.text().count("data: ") > 3  # token by token, then [DONE]
    assert page.evaluate("window.growths") > 2  # the page grew as the chunks came
    assert page.locator("#chat-error").is_hidden()
    shoot(page, "chat")


def test_the_adoption_chart_is_drawn_and_follows_the_industry(page, server):
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/ui/models")
    page.goto(f"{server.url}/ui/adoption")
    canvas = page.locator("#chart-forecast")
    expect(canvas).to_be_visible()
    drawn = """(canvas) => {
        const chart = Chart.getChart(canvas);
        return chart && chart.data.datasets.map((d) => d.data.filter((v) => v !== null).length);
    }"""
    counts = canvas.evaluate(drawn)
    assert counts[0] >= 10 and counts[2] == 12 + 1  # observed months; the forecast's horizon
    shoot(page, "adoption")
    industry = page.locator("#industry option").nth(1).get_attribute("value")
    page.select_option("#industry", industry)
    expect(page.locator("#view h2").first).to_have_text(f"Forecast: {industry}")
    assert f"industry={industry}" in page.url
    assert server.admin_key not in page.url
    page.goto(f"{server.url}/ui/usage")
    expect(page.locator("#chart-daily")).to_be_visible()
    shoot(page, "usage")
    page.goto(f"{server.url}/ui/access")
    expect(page.locator("#tenants")).to_contain_text("acme")


def test_a_user_sees_only_its_pages_and_is_refused_the_rest(page, server):
    sign_in(page, server, server.user_key)
    page.wait_for_url(f"{server.url}/ui/usage")
    # the page's nav is fetched after its load: wait for it (all_inner_texts would not)
    expect(page.locator("#pages a")).to_have_text(["Usage and costs", "Chat"])
    page.goto(f"{server.url}/ui/models")
    expect(page.locator("#view .error")).to_contain_text("this needs a maintainer key")
    page.click("#sign-out")
    page.wait_for_url(f"{server.url}/ui")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('maas.key')") is None


def test_an_admin_creates_a_tenant_and_a_key_and_revokes_it(page, server):
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/ui/models")
    page.goto(f"{server.url}/ui/access")
    page.click("text=Create a tenant")
    page.fill("#tenant-name", "web-shop")
    page.select_option("#tenant-industry", "retail")
    page.click("#tenant-form button")
    expect(page.locator("#tenants")).to_contain_text("web-shop")
    page.fill("#tenant-filter", "web-")
    shown = page.locator("#tenants tbody tr:visible")
    expect(shown).to_have_count(1)
    expect(shown).to_contain_text("web-shop")
    page.click("text=Create a tenant")  # the same name again: the API's 409, in the form
    page.fill("#tenant-name", "web-shop")
    page.click("#tenant-form button")
    expect(page.locator("#tenant-form .error")).to_contain_text("already exists")

    page.click("text=Create a key")
    page.fill("#key-name", "shop")
    page.select_option("#key-tenant", "web-shop")
    page.fill("#key-cost", "5")
    page.click("#key-form button")
    created = page.locator("#created-key-value")
    expect(created).to_contain_text("maas-")
    made = created.inner_text().strip()
    key_id = made[5:17]
    row = page.locator(f'tr[data-key="{key_id}"]')
    expect(row).to_contain_text("web-shop")
    expect(row).to_contain_text("5.00")
    headers = {"Authorization": f"Bearer {made}"}
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200
    if SHOTS:  # no secret in the docs, even a throwaway one
        created.evaluate("(code) => { code.textContent = code.textContent.slice(0, 18) + '…'; }")
    shoot(page, "access")

    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button[data-revoke]").click()
    expect(row).to_contain_text("revoked")
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401


def start_training(server, folder: Path) -> str:
    """A real ``train`` job on scikit-learn's digits, for the server's own worker: a CNN so
    small that its 100 epochs take a few seconds on CPU, long enough for the page to refresh
    a few times while it runs."""
    archive = folder / "digits.zip"
    write_digits_archive(archive)
    return start_digits_training(server, archive, epochs=100)


def test_the_jobs_page_follows_a_running_job_to_its_end_without_a_reload(page, server, tmp_path):
    sign_in(page, server, server.admin_key)
    page.wait_for_url(f"{server.url}/ui/models")
    job_id = start_training(server, tmp_path)
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url) if "/ui/views/jobs" in r.url else None)
    page.goto(f"{server.url}/ui/jobs")
    row = page.locator(f'tr[data-job="{job_id}"]')
    expect(row).to_have_attribute("data-status", re.compile("^(queued|running)$"))
    expect(row.locator("code")).to_have_text(job_id)
    expect(row).to_contain_text("train")
    expect(page.locator("#jobs")).to_have_attribute("data-refresh", "2000")
    page.evaluate("window.sameDocument = true")  # gone if the page were loaded again
    progress = row.locator("progress")
    # a tenth done or more ("0.0…" is less; "1.0" passes too): the screenshot's bar
    expect(progress).not_to_have_attribute("value", re.compile(r"^0\.0"), timeout=60_000)
    shoot(page, "jobs")
    expect(row).to_have_attribute("data-status", "succeeded", timeout=90_000)
    expect(row.locator(".status")).to_have_text("succeeded")
    expect(progress).to_have_attribute("value", "1.0")
    expect(row).to_contain_text("100%")
    expect(page.locator("#jobs[data-refresh]")).to_have_count(0)  # nothing left to follow
    assert page.evaluate("window.sameDocument") is True
    assert len(fetched) >= 2  # the first view, then its refreshes
    assert server.admin.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"
