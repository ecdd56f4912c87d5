"""The web page of `apexmtp run`, used in a real browser: Debian's chromium driven by Playwright (no browser download).

One `apexmtp run` subprocess serves the offline demo with a test gallery: the packaged families plus a tiny synthetic
APEX family whose tiers live on a local fake hub (HF_ENDPOINT), so pulling and switching run the real code. The tests
run in file order; the switching test changes the served model, so it comes last but for /metrics.

Screenshots land in $APEXMTP_SCREENSHOTS (default: a pytest temporary directory, printed at the end of the run).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import test_gallery_pull as tiny
import yaml
from fakehub import FakeHub
from test_api_server import RunProcess

from gallery.catalog import DATA_DIR, load_catalog
from gallery.detect import detect
from gallery.select import Request, candidates_for, select
from gallery.speed import GB

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: pip install '.[test]'")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is not installed "
                                "(Debian: apt-get install chromium; .ci/run installs it)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HARDWARE = {"APEXMTP_VRAM": "0", "APEXMTP_RAM": "24GiB"}  # the machine the verdicts are computed for
PARALLEL = 4  # the slots the served page plans for (its verdicts count every slot's KV)
LAST_ANSWER = "#messages .msg.assistant:last-child"
REPO = tiny.REPO
# The tiny synthetic APEX family of tests/test_gallery_pull.py: its tier GGUFs (`models`) and gallery (`gallery_dir`).
models, gallery_dir = tiny.models, tiny.gallery_dir


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = Path(os.environ.get("APEXMTP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    yield d
    print(f"\nweb page screenshots: {d}")


@pytest.fixture(scope="module")
def webui_gallery(tmp_path_factory: pytest.TempPathFactory, gallery_dir: Path) -> Path:
    """The packaged gallery plus the tiny family of tests/test_gallery_pull.py (`gallery_dir`)."""
    d = tmp_path_factory.mktemp("webui-gallery")
    shutil.copy(gallery_dir / "hardware.yaml", d / "hardware.yaml")
    archs = yaml.safe_load((DATA_DIR / "architectures.yaml").read_text())
    archs["architectures"].update(yaml.safe_load((gallery_dir / "architectures.yaml").read_text())["architectures"])
    (d / "architectures.yaml").write_text(yaml.safe_dump(archs, sort_keys=False))
    index = [*yaml.safe_load((DATA_DIR / "index.yaml").read_text()),
             *yaml.safe_load((gallery_dir / "index.yaml").read_text())]
    (d / "index.yaml").write_text(yaml.safe_dump(index, sort_keys=False))
    return d


@pytest.fixture(scope="module")
def hub(models: dict[str, Path]):
    files = {f"Tiny-APEX-MTP-{t}.gguf": p.read_bytes() for t, p in models.items()}
    with FakeHub({REPO: files}, throttle=(256 * 1024, 0.02)) as h:  # ~2 s for 20 MB: progress has steps to show
        yield h


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def server(webui_gallery: Path, hub: FakeHub, models_dir: Path, run_cache: Path):
    env = {"APEXMTP_MODELS_DIR": str(models_dir), "APEXMTP_CACHE_DIR": str(run_cache),
           "HF_ENDPOINT": hub.url, **HARDWARE}
    s = RunProcess("--context", "1024", "--parallel", str(PARALLEL), "--gallery", str(webui_gallery), env=env)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """A fresh browser context (empty localStorage) on the page, collecting console errors and page errors."""

    def __init__(self, browser, base: str, ready: str = ".pill.ready") -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 860})
        self.page = self.context.new_page()
        self.base = base
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console.{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.goto(base + "/")
        self.page.wait_for_selector(ready, timeout=30_000)

    def tab(self, name: str) -> None:
        self.page.click(f"button.tab[data-tab={name}]")

    def setting(self, selector: str, value: str) -> None:
        self.page.fill(selector, value)
        self.page.dispatch_event(selector, "change")

    def extend_chat_requests(self, **extra) -> None:
        """Add fields to the page's own /v1/chat/completions bodies (what a test needs and the page has no box for)."""
        def handle(route) -> None:
            route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), **extra}))

        self.page.route("**/v1/chat/completions", handle)

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_answer(self, pattern: str = "tok/s", timeout: float = 90_000) -> str:
        self.page.wait_for_selector(f"{LAST_ANSWER} .stats:has-text('{pattern}')", timeout=timeout)
        return self.page.text_content(f"{LAST_ANSWER} .stats")


@pytest.fixture()
def tab(browser, server):
    t = Tab(browser, server.base)
    yield t
    t.context.close()


# ------------------------------------------------------------------------------------------ the page


def test_page_loads_without_console_errors(tab: Tab, shots: Path) -> None:
    page = tab.page
    assert page.title() == "apexmtp"
    assert page.text_content("#pill") == "smollm2-135m-instruct.q4_1"
    tab.tab("gallery")
    page.wait_for_selector(".family[data-family=tiny-apex-mtp]")
    tab.tab("status")
    page.wait_for_selector("#status-memory td.bar")
    page.wait_for_timeout(2500)  # at least one status poll
    page.screenshot(path=shots / "status-start.png")
    tab.tab("chat")
    assert tab.problems == []


def test_the_page_asks_for_the_api_key(browser, tmp_path: Path, shots: Path) -> None:
    env = {"APEXMTP_MODELS_DIR": str(tmp_path / "models"), "APEXMTP_CACHE_DIR": str(tmp_path / "cache")}
    keyed = RunProcess("--context", "256", "--parallel", "1", "--api-key", "sesame", env=env)
    tab = Tab(browser, keyed.base, ready=".pill.down")
    try:
        page = tab.page
        assert page.text_content("#pill") == "API key needed" and page.is_visible("#key-form")
        assert "needs an API key" in page.text_content("#banner")
        page.screenshot(path=shots / "api-key.png")
        page.fill("#key-input", "sesame")
        page.press("#key-input", "Enter")
        page.wait_for_selector(".pill.ready", timeout=10_000)
        assert page.is_hidden("#banner") and page.is_hidden("#key-form")
        tab.send("Hi")
        assert "tok/s" in tab.wait_answer()
        # The one refused request before the key was given is the only complaint in the console.
        assert [p for p in tab.problems if "401" not in p] == [] and len(tab.problems) <= 1, tab.problems
    finally:
        tab.context.close()
        keyed.stop()


def test_chat_streams_and_shows_speed(tab: Tab, shots: Path) -> None:
    page = tab.page
    bodies: list[dict] = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(json.loads(r.post_data)))
    tab.setting("#temperature", "0")
    tab.setting("#max-tokens", "48")
    # Every change of the answer's text is recorded, to see it grow in steps rather than arrive at once.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const md = document.querySelector('#messages .msg.assistant:last-child .md');
            if (md && window.lengths.at(-1) !== md.textContent.length) window.lengths.push(md.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", "Name three colours.")
    page.press("#input", "Shift+Enter")
    page.type("#input", "One per line.")
    assert page.input_value("#input") == "Name three colours.\nOne per line."  # Shift+Enter: a new line, not sent
    assert page.query_selector_all("#messages .msg.user") == []
    page.press("#input", "Enter")
    stats = tab.wait_answer()
    assert re.fullmatch(r"\d+ tokens · \d+\.\d tok/s · first token \d+ ms · MTP: no drafts", stats), stats
    lengths = page.evaluate("window.lengths")
    assert len(lengths) >= 3 and lengths == sorted(lengths) and lengths[-1] > 0, lengths
    assert bodies[0]["stream"] is True and bodies[0]["temperature"] == 0 and bodies[0]["max_tokens"] == 48
    assert bodies[0]["messages"] == [{"role": "user", "content": "Name three colours.\nOne per line."}]
    assert int(stats.split()[0]) <= 48
    page.screenshot(path=shots / "chat.png")
    answer = page.text_content(f"{LAST_ANSWER} .md")
    page.reload()  # the conversation and the settings are kept in localStorage
    page.wait_for_selector(f"{LAST_ANSWER} .stats")
    assert page.text_content(f"{LAST_ANSWER} .md") == answer and page.text_content(f"{LAST_ANSWER} .stats") == stats
    assert page.input_value("#max-tokens") == "48"
    page.click("#clear")
    assert page.query_selector_all("#messages .msg.user") == []
    assert page.evaluate("localStorage.getItem('apexmtp.conversation')") == "[]"
    assert tab.problems == []


def test_stop_cancels_the_generation(tab: Tab, shots: Path, server: RunProcess) -> None:
    page = tab.page
    tab.extend_chat_requests(ignore_eos=True)  # so the answer cannot end on its own before Stop
    tab.setting("#max-tokens", "900")
    tab.send("Tell me a long story about the sea.")
    page.wait_for_function("""() => {
        const s = document.querySelector('#messages .msg.assistant:last-child .stats');
        return s && /generating… ([5-9]|\\d\\d+) chunks/.test(s.textContent);
    }""", timeout=60_000)
    assert server.request("GET", "/api/status")[1]["backend"]["figures"]["slots_busy"] == 1
    page.click("#stop")
    stats = tab.wait_answer("stopped after")
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    page.screenshot(path=shots / "stopped.png")
    # Closing the fetch closed the connection; the server cancelled the gRPC stream and the backend freed the slot.
    for _ in range(100):
        backend = server.request("GET", "/api/status")[1]["backend"]
        if backend["figures"]["slots_busy"] == 0:
            break
        page.wait_for_timeout(50)
    assert backend["figures"]["slots_busy"] == 0 and backend["last"]["tokens"] < 900, (stats, backend)
    assert tab.problems == []


PAYLOAD = ('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> **bold** and '
           '[click](javascript:window.pwned=3)\n\n```html\n<b>not bold</b><script>window.pwned = 4</script>\n```\n')
INSPECT = """(node) => ({
    dangerous: node.querySelectorAll('script, img, iframe, object, embed, style, svg, link, meta, form, input').length,
    handlers: [...node.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
    hrefs: [...node.querySelectorAll('a')].map(a => a.getAttribute('href')),
    strong: [...node.querySelectorAll('strong')].map(e => e.textContent),
    code: node.querySelector('pre code')?.textContent ?? null,
    text: node.textContent,
    pwned: window.pwned ?? null,
})"""


def test_markup_in_model_output_stays_inert(tab: Tab, shots: Path) -> None:
    page = tab.page
    # 1. The real model streams crafted markup (a grammar forces its output) through the real SSE path and renderer.
    tab.extend_chat_requests(grammar="root ::= " + json.dumps(PAYLOAD), temperature=0, max_tokens=300)
    tab.send("Say something.")
    tab.wait_answer()
    got = page.eval_on_selector(f"{LAST_ANSWER} .md", INSPECT)
    assert got["dangerous"] == 0 and got["handlers"] == 0 and got["hrefs"] == [] and got["pwned"] is None, got
    assert got["strong"] == ["bold"] and got["code"] == "<b>not bold</b><script>window.pwned = 4</script>"
    assert '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">' in got["text"]
    assert "[click](javascript:window.pwned=3)" in got["text"]  # an unsafe link stays text
    # 2. A stored conversation renders through the same function, reasoning folded until opened.
    stored = [{"role": "user", "content": "<b>hi</b>"},
              {"role": "assistant", "content": PAYLOAD + "\nSee [the docs](https://example.com/docs).",
               "reasoning": "<img src=x onerror=\"window.pwned = 5\"> thinking", "state": "done"}]
    page.evaluate("c => localStorage.setItem('apexmtp.conversation', JSON.stringify(c))", stored)
    page.reload()
    page.wait_for_selector(f"{LAST_ANSWER} details.reasoning")
    assert page.text_content("#messages .msg.user") == "<b>hi</b>"
    assert page.is_hidden(f"{LAST_ANSWER} details.reasoning .md")
    page.click(f"{LAST_ANSWER} details.reasoning summary")
    reasoning = page.text_content(f"{LAST_ANSWER} details.reasoning .md")
    assert reasoning == '<img src=x onerror="window.pwned = 5"> thinking'
    got = page.eval_on_selector(LAST_ANSWER, INSPECT)
    assert got["dangerous"] == 0 and got["handlers"] == 0 and got["pwned"] is None, got
    assert got["hrefs"] == ["https://example.com/docs"]
    assert page.get_attribute(f"{LAST_ANSWER} a", "rel") == "noopener noreferrer nofollow"
    page.screenshot(path=shots / "markdown.png")
    # 3. The renderer itself on known injection vectors.
    vectors = ["<svg onload=alert(1)>", "[x](JaVaScRiPt:alert(1))", "[x](data:text/html,<script>alert(1)</script>)",
               "<a href=javascript:alert(1)>x</a>", "**<img src=x onerror=alert(1)>**", "`<script>alert(1)</script>`",
               "```\n</code></pre><script>alert(1)</script>\n```", "[<img src=x>](https://ok.example)",
               "<style>body{display:none}</style>", "# <iframe src=//x></iframe>", "> <form><input></form>",
               "- <meta http-equiv=refresh content=0>", "&lt;script&gt;", "~~<b>x</b>~~ _<i>y</i>_"]
    results = page.evaluate("""async (vectors) => {
        const { renderMarkdown } = await import('/static/markdown.js');
        const inspect = """ + INSPECT + """;
        return vectors.map(v => {
            const d = document.createElement('div');
            d.append(renderMarkdown(v));
            return inspect(d);
        });
    }""", vectors)
    for vector, r in zip(vectors, results):
        assert r["dangerous"] == 0 and r["handlers"] == 0 and r["pwned"] is None, (vector, r)
        assert all(re.match(r"(https?:|mailto:)", h) for h in r["hrefs"]), (vector, r)
    assert results[-2]["text"] == "&lt;script&gt;"  # entities are text too: nothing is decoded into markup
    assert tab.problems == []


def test_gallery_lists_tiers_with_verdicts(tab: Tab, shots: Path, webui_gallery: Path, run_cache: Path) -> None:
    page = tab.page
    tab.tab("gallery")
    page.wait_for_selector(".family[data-family=tiny-apex-mtp]")
    catalog = load_catalog(webui_gallery)
    # the speeds in the verdicts come from the server's RAM-bandwidth probe (cached where it keeps its cache)
    probe = json.loads((run_cache / "ram-bandwidth.json").read_text())
    profile = replace(detect(vram=HARDWARE["APEXMTP_VRAM"], ram=HARDWARE["APEXMTP_RAM"], bandwidth=False),
                      ram_bandwidth=probe["gbps"] * GB)
    labels = {"fits on the GPU", "GPU + RAM", "CPU", "does not fit"}
    seen = set()
    for hub_entry in catalog.hubs():
        card = f".family[data-family='{hub_entry.name}']"
        rows = page.query_selector_all(f"{card} tbody tr")
        tiers = catalog.family_tiers(hub_entry)
        assert [r.get_attribute("data-name") for r in rows] == [t.name for t in tiers]
        pick = select(profile, candidates_for(catalog, hub_entry), catalog.policy, Request(parallel=PARALLEL))
        starred = [r.get_attribute("data-name") for r in rows if r.query_selector(".badge.star")]
        assert starred == ([pick.name] if pick.fits else [])
        for row, tier in zip(rows, tiers):
            verdict = select(profile, candidates_for(catalog, tier), catalog.policy, Request(parallel=PARALLEL))
            badge = row.query_selector("td.verdict .badge").text_content()
            assert badge in labels and (badge != "does not fit") == verdict.fits, (tier.name, badge)
            assert row.query_selector("td.verdict .why").text_content() == verdict.explanation
            assert row.query_selector("td.action button").text_content() == "Pull"
            seen.add(badge)
    assert {"CPU", "does not fit"} <= seen  # this 24 GiB CPU-only machine: the tiny tiers fit, the 35B top tiers not
    assert page.text_content(".family[data-family=demos] tr[data-name=demo] .badge") == "serving"
    page.screenshot(path=shots / "gallery.png", full_page=True)
    assert tab.problems == []


def test_pull_with_progress_then_switch_models(tab: Tab, shots: Path, server: RunProcess, hub: FakeHub,
                                               models_dir: Path, models: dict[str, Path]) -> None:
    page = tab.page
    name = "tiny-apex-mtp-i-quality"
    row = f".family[data-family=tiny-apex-mtp] tr[data-name={name}]"
    tab.tab("gallery")
    page.wait_for_selector(f"{row} td.action button")
    page.evaluate("""(row) => {
        window.progress = [];
        new MutationObserver(() => {
            const text = document.querySelector(row + ' .progress-text')?.textContent;
            if (text && window.progress.at(-1) !== text) window.progress.push(text);
        }).observe(document.getElementById('families'), {childList: true, subtree: true, characterData: true});
    }""", row)
    page.click(f"{row} td.action button")
    midway = "row => /\\(([1-9]\\d?)%\\)/.test(document.querySelector(row + ' .progress-text')?.textContent)"
    page.wait_for_function(midway, arg=row, timeout=60_000)
    page.wait_for_timeout(300)  # the bar's width eases in over 0.2 s
    page.screenshot(path=shots / "pull-progress.png")
    page.wait_for_selector(f"{row} td.action button:has-text('Use')", timeout=60_000)
    # The bar follows the partial file, which huggingface_hub extends 10 MiB at a time: a 20 MB file has one step
    # between 0 and 100% (a 16 GiB tier has ~1600).
    steps = [int(m.group(1)) for t in page.evaluate("window.progress") if (m := re.search(r"\((\d+)%\)", t))]
    assert any(0 < s < 100 for s in steps) and steps == sorted(steps) and steps[-1] == 100, steps
    on_disk = models_dir / f"llama-cpp/models/{REPO}/Tiny-APEX-MTP-I-Quality.gguf"
    assert on_disk.read_bytes() == models["I-Quality"].read_bytes()
    assert len(hub.gets("Tiny-APEX-MTP-I-Quality.gguf")) == 1
    # Switch the served model to the pulled tier: LoadModel on the same backend process.
    pid = server.backend()["pid"]
    page.click(f"{row} td.action button:has-text('Use')")
    page.wait_for_selector(f"#pill.ready:has-text('{name}')", timeout=120_000)
    page.wait_for_selector(f"{row} .badge.serving")
    assert server.backend()["pid"] == pid and server.request("GET", "/health")[1]["model"] == name
    assert page.text_content("#messages .msg.note").startswith(f"now serving {name} (context 1k, MTP on)")
    page.screenshot(path=shots / "switched.png", full_page=True)
    # And to the demo with a predictable MTP head, where the answer's line shows draft acceptance.
    page.click(".family[data-family=demos] tr[data-name=demo-mtp] button:has-text('Use')")
    page.wait_for_selector("#pill.ready:has-text('demo-mtp')", timeout=120_000)
    tab.tab("chat")
    tab.setting("#temperature", "0")
    tab.setting("#max-tokens", "64")
    tab.send("Hello there.")
    stats = tab.wait_answer()
    m = re.search(r"MTP (\d+)/(\d+) drafts accepted \((\d+)%\)", stats)
    assert m and 0 < int(m.group(1)) <= int(m.group(2)), stats
    page.screenshot(path=shots / "chat-mtp.png")
    tab.tab("status")
    page.wait_for_function("() => document.querySelector('#status-mtp').textContent.includes('%')")
    mtp = page.text_content("#status-mtp")
    assert "MTPon" in mtp and re.search(r"acceptance\d+%", mtp), mtp
    assert "slots busy0 of 4" in page.text_content("#status-serving")
    page.screenshot(path=shots / "status.png")
    problems = [p for p in tab.problems if "503" not in p]  # a poll may meet the server mid-switch
    assert problems == []


def test_metrics_parse_as_prometheus(server: RunProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client = server.client()
    r = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, max_tokens=16,
                                       messages=[{"role": "user", "content": "hi"}])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    for line in text.splitlines():  # strict: every line a HELP/TYPE comment or `name{labels} value`
        assert re.fullmatch(r'# (HELP|TYPE) apexmtp_\w+ .+|apexmtp_\w+(\{(\w+="[^"]*",?)+\})? -?[\d.e+-]+', line), line
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
    assert families["apexmtp_requests"].type == "counter" and value["apexmtp_requests"] >= 1
    assert value["apexmtp_generated_tokens"] >= r.usage.completion_tokens
    assert value["apexmtp_draft_n"] >= value["apexmtp_draft_n_accepted"] > 0  # demo-mtp is served now
    assert value["apexmtp_slots"] == 4 and value["apexmtp_queue_depth"] == 0 and value["apexmtp_backend_up"] == 1
    assert value["apexmtp_last_tokens_per_second"] > 0
    parts = {s.labels["part"]: s.value for s in families["apexmtp_memory_bytes"].samples}
    assert parts["weights"] > 0 and all(v >= 0 for v in parts.values())
    (info,) = families["apexmtp_model_info"].samples
    assert info.labels["model"] == "demo-mtp" and info.labels["mtp"] == "true"
