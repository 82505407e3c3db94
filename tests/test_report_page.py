"""The run report's self-contained report.html (built from the recorded run tests/fixtures/run)
opened in headless Chromium from a file:// URL: title and section headings, every embedded
plot decoded, no horizontal overflow at 1000 px, and a full-page screenshot in
tests/artifacts/report.png; the same for the transfer experiment's report
(tests/artifacts/transfer_report.png)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
from cdp import ARTIFACTS, Page, browser_fixture  # noqa: F401  (the `browser` fixture)

from instill.report import write_run_report
from instill.report.experiment_report import write_transfer_report

FIXTURE = Path(__file__).parent / "fixtures" / "run"
WIDTH = 1000
SECTIONS = [
    "Recipe",
    "Claims and what the numbers say",
    "Performance",
    "Generalisation: seen vs held-out clusters",
    "Forgetting: general knowledge and general behaviour",
    "Time and cost",
    "Training curves",
    "Data",
]


def texts(page: Page, selector: str) -> list[str]:
    return page.js(
        f"Array.from(document.querySelectorAll({json.dumps(selector)}), e => e.textContent)"
    )


def render(browser, html: Path, shot_name: str) -> Page:
    """Open a report page in Chromium at WIDTH px, check that every plot decoded and that
    nothing overflows, and save a full-page screenshot to tests/artifacts/SHOT_NAME."""
    targets = httpx.get(f"http://127.0.0.1:{browser}/json/list").json()
    page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
    page.call("Page.enable")
    page.call(
        "Emulation.setDeviceMetricsOverride", width=WIDTH, height=700, deviceScaleFactor=1,
        mobile=False,
    )  # fmt: skip
    page.call("Page.navigate", url=html.as_uri())
    page.wait(
        "document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
    )
    assert page.js("location.protocol") == "file:"
    images = page.js(
        "Array.from(document.images, i => ({complete: i.complete, w: i.naturalWidth,"
        " h: i.naturalHeight, shown: i.getBoundingClientRect().width,"
        " src: i.src.slice(0, 22)}))"
    )
    for img in images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        assert img["src"] == "data:image/png;base64,", img  # self-contained
        assert 0 < img["shown"] <= WIDTH, img
    page.images = images
    assert page.js("window.innerWidth") == WIDTH
    overflow = page.js(
        "({scroll: document.documentElement.scrollWidth, inner: window.innerWidth,"
        " wide: Array.from(document.querySelectorAll('body > *'))"
        ".filter(e => e.getBoundingClientRect().right > window.innerWidth)"
        ".map(e => e.tagName + ' ' + Math.round(e.getBoundingClientRect().width))})"
    )
    assert overflow["scroll"] <= overflow["inner"] + 1, overflow
    size = page.call("Page.getLayoutMetrics")["cssContentSize"]
    assert size["height"] > 700  # the whole report, longer than one screen
    shot = page.call(
        "Page.captureScreenshot",
        format="png",
        captureBeyondViewport=True,
        clip={"x": 0, "y": 0, "width": WIDTH, "height": size["height"], "scale": 1},
    )
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / shot_name
    out.write_bytes(png)
    print(f"screenshot: {out} ({WIDTH}x{round(size['height'])} px)")
    return page


def test_report_page_renders_in_chromium(browser, tmp_path):
    run = Path(shutil.copytree(FIXTURE, tmp_path / "run"))
    _, report = write_run_report(run)
    plots = sorted(p.name for p in run.glob("*.png"))
    assert plots == ["generalisation.png", "loss_curve.png", "performance.png"]
    title = f"instill run {json.loads((run / 'run.json').read_text())['name']}: what tuning bought"
    page = render(browser, report, "report.png")
    try:
        assert page.js("document.title") == title
        assert texts(page, "h1") == [title]
        assert texts(page, "h2") == SECTIONS
        suites = sorted({p.stem.removeprefix("base-") for p in (run / "eval").glob("*.jsonl")})
        h3 = texts(page, "h3")
        tasks = [s for s in suites if s != "general"]  # general: under Forgetting, once
        assert sorted(h.split(" ")[1] for h in h3 if h.startswith("Suite ")) == tasks
        assert "General knowledge (choice accuracy, %)" in h3  # the forgetting section's guard
        assert len(page.images) >= len(plots), page.images
    finally:
        page.ws.close()


def test_transfer_report_page_renders_in_chromium(browser, tmp_path):
    folder = tmp_path / "fixture-transfer"  # the recorded run as both starts
    shutil.copytree(FIXTURE, folder / "pretrained")
    scratch = Path(shutil.copytree(FIXTURE, folder / "scratch"))
    for p in (scratch / "eval").glob("base-*"):
        p.unlink()
    page = render(browser, write_transfer_report(folder), "transfer_report.png")
    try:
        assert texts(page, "h2") == [
            "The four claims",
            "1. Better answers",
            "2. Training time: validation loss from each start",
            "3. Generalisation: seen vs held-out clusters",
            "4. Cost",
        ]
        assert len(page.images) >= 3  # performance, curves, cost (and generalisation)
    finally:
        page.ws.close()
