"""`colo view` in a real browser: headless Chromium (Debian's), driven by Playwright, against the real three
processes. Step through a checkpoint message by message; see +OK reach the client only after the commit; download
both exports; kill the primary from the page and watch the secondary take over and answer; switch to hybrid.

Screenshots are saved as test artefacts (under pytest's tmp dir, printed at the end); COLO_DOC_IMAGES=1 also
writes the ones docs/tutorial.md shows into docs/img/. Outside CI (no $CI), the tests skip, saying why, when
Playwright or Chromium is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colo.lifeline import Lifeline
from colo_e2e.helpers import child_env
from conftest import ROOT
from traceshape import check_mermaid, check_perfetto

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
DOC_IMAGES = ROOT / "docs" / "img"
STEP_TIMEOUT = 10_000  # ms: a Step and the message it lets go


def chromium() -> str | None:
    for path in (os.environ.get("COLO_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if path and Path(path).exists():
            return path
    return None


def _need(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs it: .ci/run)")
    pytest.skip(what)


try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("view-screenshots")
    yield d
    print(f"\nbrowser test screenshots: {d}")


def shot(page: Page, shots: Path, name: str, doc: bool = False) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if doc and os.environ.get("COLO_DOC_IMAGES"):
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOC_IMAGES / path.name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        _need("Playwright is not installed (pip install playwright; its own browser download is not needed)")
    exe = chromium()
    if exe is None:
        _need("no Chromium found (apt-get install chromium, or set COLO_CHROMIUM)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[dict[str, Any]]:
    """`colo view kvstore` as a user starts it (a 700 ms interval: slow enough to step, fast enough to test)."""
    d = tmp_path_factory.mktemp("view")
    ready = d / "ready.json"
    log = open(d / "view.log", "wb")
    life = Lifeline()  # a killed pytest leaves no view (and no roles) running
    proc = subprocess.Popen([sys.executable, "-m", "colo", "view", "kvstore", "--no-browser", "--listen",
                             "127.0.0.1:0", "--interval", "700", "--ready-file", str(ready), "--no-encrypt",
                             *life.args()], stdout=log, stderr=log, env=child_env(), cwd=ROOT,
                            start_new_session=True, pass_fds=life.pass_fds)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"colo view did not start: {(d / 'view.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield {"url": json.loads(ready.read_text())["url"], "dir": d, "proc": proc}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        life.close()
        log.close()


@pytest.fixture
def page(browser: Browser, view: dict[str, Any]) -> Iterator[Page]:
    pg = browser.new_page(viewport={"width": 1660, "height": 1000}, accept_downloads=True)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(view["url"])
    pg.wait_for_selector("#timeline rect.bar", timeout=30_000)  # protected, checkpoints running
    yield pg
    if pg.is_checked("#chk-step"):
        pg.uncheck("#chk-step")
    pg.close()
    assert not errors, f"the page threw: {errors}"


def next_waiting(page: Page) -> str:
    page.wait_for_function("document.getElementById('next-message').dataset.msg !== ''", timeout=STEP_TIMEOUT)
    return str(page.get_attribute("#next-message", "data-msg"))


def step(page: Page, key: str | None = None) -> str:
    """Press Step (the button, or `key` on the page); the message that waited is sent, and it is the one
    highlighted. Returns its label."""
    msg = next_waiting(page)
    before = page.get_attribute("#seq .arrow.current", "data-t") if page.locator("#seq .arrow.current").count() else ""
    if key:
        page.keyboard.press(key)
    else:
        page.click("#btn-step")
    page.wait_for_function(
        "([msg, before]) => { const c = document.querySelector('#seq .arrow.current');"
        " return c && c.dataset.msg === msg && c.dataset.t !== before; }", arg=[msg, before], timeout=STEP_TIMEOUT)
    return str(page.text_content("#seq .arrow.current text"))


def test_step_through_one_checkpoint(page: Page, shots: Path) -> None:
    page.check("#chk-step")
    assert "suspended while stepping" in page.inner_text("#step-banner")
    while next_waiting(page) != "checkpoint-request":  # a checkpoint under way when stepping began: finish it
        step(page)
    label = step(page)
    epoch = int(re.search(r"epoch=(\d+)", label)[1])  # type: ignore[index]
    assert page.text_content("#proto-primary") == "REQUESTED"  # each side's protocol state, from its events
    seen = ["checkpoint-request"]
    # The keys step too, but not while the Redis box has the focus (an "s" typed there is a letter).
    waiting = next_waiting(page)
    page.focus("#redis-cmd")
    page.keyboard.press("s")
    page.wait_for_timeout(300)
    assert page.get_attribute("#next-message", "data-msg") == waiting
    page.fill("#redis-cmd", "SET k v")
    page.locator("#redis-cmd").blur()
    while not {"commit", "vmstate-loaded"} <= set(seen):
        label = step(page, key=("s", "ArrowRight", None)[len(seen) % 3])
        seen.append(label.split()[0])
        assert f"epoch={epoch}" in label, label  # every message of the handshake names its epoch
        if seen[-1] == "vmstate-chunk":
            shot(page, shots, "view-step", doc=True)  # the pause, mid-checkpoint
    order = [m for m in seen if m != "vmstate-chunk"]
    assert order[:5] == ["checkpoint-request", "checkpoint-reply", "vmstate-send", "vmstate-size",
                         "vmstate-received"], seen
    assert sorted(order[5:]) == ["commit", "vmstate-loaded"], seen  # the two may go in either order
    assert "vmstate-chunk" in seen and seen.count("checkpoint-request") == 1
    # a page's address range on hover
    box = page.locator("#ram-primary").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 3, box["y"] + 3)
    assert re.search(r"primary page 0: 0x00000000-0x00000fff", page.inner_text("#tip"))


def test_ok_reaches_the_client_only_after_the_commit(page: Page, shots: Path) -> None:
    page.check("#chk-step")
    next_waiting(page)  # the primary holds still at a gate: the SET waits for the guest to run again
    page.fill("#redis-cmd", "SET k v")
    page.click("#btn-redis")
    reply = page.locator("#redis-log li").last.locator(".reply")
    covering: int | None = None
    for _ in range(40):
        msg = next_waiting(page)
        if covering is None:
            held = page.locator("#outputs .out.held")
            if held.count():
                covering = int(re.search(r"checkpoint (\d+)", held.last.inner_text())[1])  # type: ignore[index]
        assert "waiting" in (reply.get_attribute("class") or ""), "the reply came before its commit"
        label = step(page)
        if msg == "commit" and covering is not None and f"epoch={covering}" in label:
            break
    else:
        raise AssertionError("no commit covered the reply")
    page.wait_for_function("document.querySelector('#redis-log li:last-child .reply').textContent === '+OK'",
                           timeout=STEP_TIMEOUT)
    assert page.locator("#outputs .out.released").last.inner_text().endswith(f"released at commit {covering}")
    shot(page, shots, "view-commit", doc=True)


def test_exports_download_and_parse(page: Page, view: dict[str, Any]) -> None:
    with page.expect_download() as d:
        page.click("#export-perfetto")
    doc = json.loads(Path(d.value.path()).read_text())
    check_perfetto(doc)
    assert any(e["ph"] == "s" for e in doc["traceEvents"])
    with page.expect_download() as d:
        page.click("#export-mermaid")
    text = Path(d.value.path()).read_text()
    names = [a[2].split()[0] for a in check_mermaid(text)]
    assert "checkpoint-request" in names and "commit" in names
    # an epoch replayed from the recorded events
    bar = page.locator("#timeline rect.bar").nth(2)
    epoch = bar.get_attribute("data-epoch")
    bar.click()
    assert page.is_visible("#replay-banner") and f"checkpoint {epoch}" in page.inner_text("#replay-title")
    page.wait_for_function(
        "[...document.querySelectorAll('#seq .arrow')].some(a => a.dataset.msg === 'vmstate-loaded')", timeout=20_000)
    assert f"epoch={epoch}" in (page.text_content("#seq") or "")
    page.click("#btn-live")


def test_manual_checkpoint_and_slow_motion(page: Page) -> None:
    page.click("#btn-checkpoint")
    page.wait_for_selector("#timeline rect.bar[data-trigger='manual']", timeout=10_000)
    page.locator("#rng-slow").fill("300")
    page.dispatch_event("#rng-slow", "change")
    assert "Slow motion" in page.inner_text("#step-banner")
    page.wait_for_function("[...document.querySelectorAll('#timeline rect.bar')].some(b => +b.dataset.span > 1800)",
                           timeout=20_000)  # seven messages, 300 ms each: a checkpoint from its request to loaded
    page.locator("#rng-slow").fill("0")
    page.dispatch_event("#rng-slow", "change")


def test_the_page_fits_a_laptop_screen_and_its_labels_stay_apart(browser: Browser, view: dict[str, Any],
                                                                  shots: Path) -> None:
    """At 1366 px nothing scrolls sideways (the side boxes go below the diagram), and a checkpoint's phase labels
    neither run into the times at the right edge nor into each other, and are drawn over the messages' labels."""
    pg = browser.new_page(viewport={"width": 1366, "height": 800})
    try:
        pg.goto(view["url"])
        pg.wait_for_selector("#seq g.phase text", timeout=30_000)
        assert pg.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        # One look at a diagram that has phase labels (it is redrawn on every event, and a new checkpoint's
        # request clears the last one's phases): wait_for_function retries until a drawing has them.
        boxes = pg.wait_for_function("""() => {
            const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
            const seq = document.getElementById('seq');
            const phases = [...seq.querySelectorAll('g.phase text')].map(box);
            return phases.length ? { phases, times: [...seq.querySelectorAll('.arrow text.when')].map(box),
                                     notes: [...seq.querySelectorAll('text.note')].map(box), svg: box(seq),
                                     last: seq.lastElementChild.matches('g.phase') } : null;
        }""", timeout=30_000).json_value()
        shot(pg, shots, "view-1366")
        # A step-mode pause has long numbers: its summary wraps within the diagram instead of running past it.
        items = ["request 354.61", "collect 0.69", "resume 0.07", "send 559.27", "received 156.95", "loaded 198.23"]
        lines = pg.evaluate("(items) => wrapWords('checkpoint 6 on the primary, 1270.09 ms in all:', items, ' ms')",
                            items)
    finally:
        pg.close()

    def meet(a: list[float], b: list[float]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    phases, times = boxes["phases"], boxes["times"]
    assert phases and times
    assert not [(p, t) for p in phases for t in times if meet(p, t)]
    assert not [(a, b) for i, a in enumerate(phases) for b in phases[i + 1:] if meet(a, b)]
    assert boxes["last"], "the phase labels are drawn last (on top of the messages)"
    assert all(n[2] <= boxes["svg"][2] for n in boxes["notes"]), "the phase summary runs past the diagram"
    assert len(lines) == 2 and all(len(line) <= 900 // 7 for line in lines), lines
    assert " · ".join(line.strip() for line in lines).replace(": · ", ": ") == \
        "checkpoint 6 on the primary, 1270.09 ms in all: " + " · ".join(items) + " ms"


def test_kill_the_primary_from_the_page(page: Page, shots: Path) -> None:
    # Before any kill there is no failover to show, even when the gateway said "down" while it waited for its
    # first primary (it starts first): a "down" before the service was ever served opens none.
    assert "no failover yet" in page.inner_text("#failover")
    opened = page.evaluate("""() => {
        const served = page.served, before = page.failover.length;
        page.served = false;
        handle({ kind: "witness", event: "down", t: 1e9, level: "info",
                 reason: "no node has attached yet: clients are refused until a primary does" });
        const after = page.failover.length;
        page.served = served;
        return after - before;
    }""")
    assert opened == 0 and "no failover yet" in page.inner_text("#failover")
    page.fill("#redis-cmd", "SET colour blue")
    page.click("#btn-redis")
    page.wait_for_function("document.querySelector('#redis-log li:last-child .reply').textContent === '+OK'")
    before = json.loads(page.evaluate("JSON.stringify(page.status.nodes)"))  # the page's own view of the roles
    secondary = before["secondary"]["id"]
    page.click("#btn-kill-primary")
    page.wait_for_function(f"page.status.nodes && page.status.nodes.primary.id === '{secondary}'", timeout=20_000)
    steps = page.inner_text("#failover")
    assert "lost" in steps and "promote" in steps
    page.fill("#redis-cmd", "GET colour")
    page.click("#btn-redis")
    page.wait_for_function("document.querySelector('#redis-log li:last-child .reply').textContent === '\"blue\"'",
                           timeout=20_000)
    page.wait_for_function("document.getElementById('failover').innerText.includes('protected again')",
                           timeout=40_000)  # a new spare, copied: the survivor is protected again
    assert "generation 2" in page.inner_text("#mode-info")
    shot(page, shots, "view-failover", doc=True)


def test_switch_to_hybrid(page: Page, shots: Path) -> None:
    run = page.evaluate("page.run")
    page.select_option("#sel-mode", "hybrid")
    page.click("#btn-mode")
    # a new pair: the page starts over on the new run's events (it reloads), then the pair is protected
    page.wait_for_function(f"typeof page !== 'undefined' && page.run > {run}", timeout=60_000)
    page.wait_for_function("document.getElementById('mode-info').textContent.startsWith('hybrid')", timeout=30_000)
    page.wait_for_function("document.getElementById('service').textContent === 'protected'", timeout=30_000)
    page.fill("#redis-cmd", "SET k hybrid")
    page.click("#btn-redis")
    page.wait_for_function("document.querySelector('#redis-log li:last-child .reply').textContent === '+OK'",
                           timeout=20_000)
    page.wait_for_selector("#compare-box:not([hidden])", timeout=10_000)
    assert "released" in page.inner_text("#compare")
    shot(page, shots, "view-hybrid", doc=True)
    # the secondary's turn: the primary goes on alone, then a new spare is copied (a hybrid secondary runs too)
    page.click("#btn-kill-secondary")
    page.wait_for_function("document.getElementById('failover').innerText.includes('protected again')",
                           timeout=40_000)
    page.fill("#redis-cmd", "GET k")
    page.click("#btn-redis")
    page.wait_for_function("document.querySelector('#redis-log li:last-child .reply').textContent === '\"hybrid\"'",
                           timeout=20_000)
