"""The browser client at / in headless Chromium (Playwright) against a real server: the /health
panel, the API key field and a refusal shown to the user, a microphone (Chromium's fake capture
device playing a speech-like wav) talking to the model in PCM and in Opus mode, audio and text
flowing both ways, the session count, disconnect, the "TTT learning" plot of the session's
telemetry. Saves screenshots under tests/artifacts/.

Needs /usr/bin/chromium (or $MOSHI_TTT_CHROMIUM) and the `playwright` package; `make install`
installs both, and this test fails, never skips, without them."""

from __future__ import annotations

import math
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from fixtures import make_tiny_base, write_wav
from serving import ServerThread
from test_server import get_json, settings, text_head_in_vocab

CHROMIUM = Path(os.environ.get("MOSHI_TTT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "tests" / "artifacts"
API_KEY = "browser-test-key"
N = 25  # frames (80 ms each) that must flow each way: 2 s of conversation


def speech_like(seconds: float = 4.0, sr: int = 48000) -> np.ndarray:
    """Voiced syllables: a gliding 100-160 Hz pitch with harmonics shaped by three formants,
    about four syllables a second, a pause each second, a little breath noise."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 130 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = (700, 1200, 2600)
    voiced = np.zeros_like(t)
    for k in range(1, 30):
        gain = sum(np.exp(-(((k * f0) - f) / 180) ** 2) for f in formants) + 0.05
        voiced += gain / k * np.sin(k * phase)
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.6
    pauses = (t % 1.0) < 0.75
    noise = np.random.default_rng(0).normal(0, 0.02, t.size)
    pcm = voiced * syllables * pauses + noise
    return (0.5 * pcm / np.abs(pcm).max()).astype(np.float32)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = make_tiny_base(tmp_path_factory.mktemp("browser"))
    # A shared CPU may run even the tiny model slower than the microphone's real time: let input
    # queue up (80 s) rather than have the server end the session with "input overflow".
    with ServerThread(settings(base, api_key=API_KEY, max_buffered_frames=1000)) as s:
        text_head_in_vocab(s)
        yield s


def require_browser_tools():
    """Playwright's `sync_playwright`, or a failure that says how to install what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: `make install` installs it "
                    "(the project's dev extra)", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs chromium with apt-get "
                    f"(or point MOSHI_TTT_CHROMIUM at a Chromium binary)", pytrace=False)
    return sync_playwright


def test_chromium_and_playwright_are_installed():
    require_browser_tools()  # the other tests error at setup without them; this one fails


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_playwright = require_browser_tools()
    wav = tmp_path_factory.mktemp("mic") / "speech.wav"
    write_wav(wav, speech_like()[None], 48000)  # 16-bit PCM, as Chromium wants; it loops
    args = [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
    ]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, srv):
    ctx = browser.new_context(viewport={"width": 1280, "height": 720})
    pg = ctx.new_page()
    problems: list[str] = []  # uncaught exceptions and console errors: none are expected
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
          if m.type == "error" else None)
    pg.goto(srv.http("/"))
    yield pg
    ctx.close()
    assert not problems, problems


@pytest.fixture
def heard(srv, monkeypatch) -> list[float]:
    """RMS of every audio frame the engine receives: what the server made of the microphone."""
    rms: list[float] = []
    push = srv.engine.push

    def recording_push(handle, frame):
        rms.append(float(np.sqrt(np.mean(np.square(frame)))))
        push(handle, frame)
    monkeypatch.setattr(srv.engine, "push", recording_push)
    return rms


def metric(srv: ServerThread, name: str) -> float:
    text = urllib.request.urlopen(srv.http("/metrics"), timeout=30).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def stats(page) -> dict:
    return page.evaluate("() => ({...window.moshiStats})")


def wait_engine_idle(srv: ServerThread, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while srv.engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.engine.active == 0, "the server still holds the session after disconnect"


def talk(page, srv, heard: list[float], mode: str) -> dict:
    """Connect in `mode`, wait until N frames went each way and text came back, check that the
    server heard the wav's syllables and pauses; returns the page's stats (still connected)."""
    from playwright.sync_api import expect

    page.fill("#api-key", API_KEY)
    page.select_option("#encoding", mode)
    frames_before = metric(srv, "moshi_ttt_frames_total")
    page.click("#connect")
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=30_000)
    expect(page.locator("#session-info")).to_contain_text(mode)
    deadline = time.monotonic() + 120
    while True:  # polled from here, so that a failure shows how far the session got
        s = stats(page)
        if s["state"] != "live" or s["errors"]:
            pytest.fail(f"the session ended early: {s}")
        if s["framesSent"] > N and s["framesReceived"] > N and s["transcript"].strip() \
                and s["playedMs"] > 500:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"audio or text did not flow within 120 s: {s}")
        time.sleep(0.25)
    assert metric(srv, "moshi_ttt_frames_total") - frames_before >= N  # the model ran them
    assert srv.engine.active == 1
    # loud syllables and near-silent pauses: the fake microphone's speech, not silence or noise
    assert len(heard) >= N
    assert sum(r > 0.05 for r in heard) > len(heard) / 3, heard
    assert sum(r < 0.02 for r in heard) >= 2, heard
    expect(page.locator("#transcript")).not_to_be_empty()
    page.wait_for_function(  # the DOM counters follow the stats within 200 ms
        f"() => +document.querySelector('#stat-sent').textContent > {N} "
        f"&& +document.querySelector('#stat-received').textContent > {N}", timeout=5_000)
    # the panel refreshes /health every 2 s: it must show this session
    expect(page.locator("#health-sessions")).to_contain_text("1 / 2", timeout=10_000)
    return s


# Each plotted series, the CSS variable of its colour and the plot area it is drawn in.
PLOT_SERIES = {"inner_loss_before": ("--plot-before", "loss"),
               "inner_loss_after": ("--plot-after", "loss"), "drift": ("--plot-drift", "drift")}


def plot_pixels(page) -> dict:
    """Read the TTT plot back from its canvas (getImageData): per series, the pixels of its
    colour inside its area, and `painted`, the non-background (not transparent) pixels of the
    areas. All 0 while nothing is plotted."""
    return page.evaluate("""(series) => {
      const canvas = document.getElementById('ttt-plot');
      const g = window.moshiTTT.plot;
      const counts = { painted: 0 };
      for (const key of Object.keys(series)) counts[key] = 0;
      if (!g) return counts;
      const ctx = canvas.getContext('2d');
      const pixels = (area) => ctx.getImageData(Math.round(area.x * g.dpr),
        Math.round(area.y * g.dpr), Math.round(area.w * g.dpr), Math.round(area.h * g.dpr)).data;
      for (const name of ['loss', 'drift']) {
        const d = pixels(g[name]);
        for (let i = 3; i < d.length; i += 4) counts.painted += d[i] > 0;
      }
      for (const [key, [cssVar, area]] of Object.entries(series)) {
        const hex = getComputedStyle(canvas).getPropertyValue(cssVar).trim();
        const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
        const d = pixels(g[area]);
        for (let i = 0; i < d.length; i += 4) {
          const diff = Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) +
            Math.abs(d[i + 2] - rgb[2]);
          counts[key] += d[i + 3] > 200 && diff < 40;
        }
      }
      return counts;
    }""", PLOT_SERIES)


def telemetry(page) -> list[dict]:
    return page.evaluate("() => window.moshiTTT.telemetry")


def disconnect(page, srv) -> None:
    from playwright.sync_api import expect

    page.click("#connect")
    expect(page.locator("#status-text")).to_contain_text("Closed (1000", timeout=30_000)
    expect(page.locator("#connect")).to_have_text("Connect")
    wait_engine_idle(srv)
    assert get_json(srv.http("/health"))[1]["sessions"]["active"] == 0
    expect(page.locator("#health-sessions")).to_contain_text("0 / 2", timeout=10_000)


def test_model_panel_shows_the_servers_dims(page, srv):
    from playwright.sync_api import expect

    expect(page).to_have_title("moshi-ttt")
    expect(page.locator("#health-status")).to_have_text("ready", timeout=30_000)
    expect(page.locator("#health-main")).to_have_text("d_model 64 · 4 heads · 4 layers")
    expect(page.locator("#health-depformer")).to_have_text("d_model 32 · 4 heads · 2 layers")
    expect(page.locator("#health-ttt")).to_contain_text("layers 0, 1 · K = 16")
    expect(page.locator("#health-params")).to_have_text("3.76 M total · 102 k TTT")
    expect(page.locator("#health-device")).to_have_text("cpu · float32")
    expect(page.locator("#health-sessions")).to_have_text("0 / 2 active")
    expect(page.locator("#health-checkpoint")).to_contain_text("base/base (base, step 0)")
    expect(page.locator("#server-badge")).to_have_attribute("data-state", "ok")


def fake_point(i: int) -> dict:
    """A telemetry message as the server words it: a loss falling with the session, the update
    lowering it further, a growing drift; input dependence not measured in every point."""
    before, after, drift = 0.9 - 0.03 * i, 0.75 - 0.03 * i, 0.002 * i
    return {"type": "ttt_telemetry", "session": "s1", "frame": 12 * i, "window_frames": 12,
            "inner_loss_before": before, "inner_loss_after": after, "drift": drift,
            "input_dependence": None if i % 2 else 0.9,
            "layers": [{"layer": n, "inner_loss_before": before, "inner_loss_after": after,
                        "drift": drift, "input_dependence": None} for n in (0, 1)]}


def test_ttt_plot_draws_injected_telemetry(page):
    """The plot's states and drawing, fed METADATA messages through the page's handler."""
    from playwright.sync_api import expect

    receive = "(metas) => metas.forEach((m) => window.moshiTTT.receive(m))"
    empty = page.locator("#ttt-empty")
    expect(empty).to_have_text("no telemetry yet")
    assert plot_pixels(page)["painted"] == 0
    # the session info of a server that sends none, as today's server words it (no "type")
    page.evaluate(receive, [{"session": "s1", "slot": 0, "mode": "pcm", "telemetry_every": 0}])
    expect(empty).to_have_text("telemetry off")
    page.evaluate(receive, [{"type": "session", "session": "s1", "slot": 0, "mode": "pcm",
                             "telemetry_every": 12}])
    expect(empty).to_have_text("no telemetry yet")
    expect(page.locator("#ttt-info")).to_have_text("every 12 frames (0.96 s)")
    page.evaluate(receive, [{"type": "something_newer", "frame": 1}])  # ignored
    assert telemetry(page) == [] and page.evaluate("() => window.moshiStats.session") == "s1"

    page.wait_for_timeout(300)  # start-up draws and resizes are over
    draws = page.evaluate("() => window.moshiTTT.draws")
    page.evaluate(receive, [fake_point(i) for i in range(1, 11)])
    page.wait_for_function("() => window.moshiTTT.plot !== null", timeout=5_000)
    page.wait_for_timeout(300)
    # ten points in one task: one redraw, on the next animation frame
    assert page.evaluate("() => window.moshiTTT.draws") == draws + 1
    expect(empty).to_be_hidden()
    expect(page.locator("#ttt-loss")).to_have_text("0.600 → 0.450")
    expect(page.locator("#ttt-drift")).to_have_text("0.0200")
    expect(page.locator("#ttt-frames")).to_have_text("120 (9.6 s)")
    assert len(telemetry(page)) == 10
    px = plot_pixels(page)
    assert all(px[k] > 50 for k in PLOT_SERIES), px
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator(".ttt").screenshot(path=str(ARTIFACTS / "browser-ttt-plot-injected.png"))


def test_refusal_is_shown_with_its_reason(page, srv):
    from playwright.sync_api import expect

    refused = metric(srv, "moshi_ttt_sessions_refused_total")
    page.click("#connect")  # no API key
    expect(page.locator("#error")).to_contain_text("missing or wrong API key", timeout=30_000)
    expect(page.locator("#status-text")).to_contain_text("Closed (1008 refused: auth)")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    expect(page.locator("#connect")).to_have_text("Connect")
    assert metric(srv, "moshi_ttt_sessions_refused_total") == refused + 1
    assert srv.engine.active == 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-client-refused.png"), full_page=True)


def check_session_telemetry(page, session: str) -> list[dict]:
    """The server's telemetry of this session reached the page and the plot: points every 12
    frames (the server's default) with finite figures, each series drawn. Waits for 4 points
    (about 4 s of session), not just the 2 needed for lines, so the screenshot shows a trend."""
    from playwright.sync_api import expect

    expect(page.locator("#ttt-info")).to_have_text("every 12 frames (0.96 s)")
    page.wait_for_function("() => window.moshiTTT.telemetry.length >= 4 "
                           "&& window.moshiTTT.plot !== null", timeout=60_000)
    points = telemetry(page)
    frames = [p["frame"] for p in points]
    assert frames == sorted(set(frames)) and frames[0] > 0, frames
    for p in points:
        assert p["type"] == "ttt_telemetry" and p["session"] == session, p
        for key in ("inner_loss_before", "inner_loss_after", "drift"):
            assert isinstance(p[key], (int, float)) and math.isfinite(p[key]), (key, p)
            assert p[key] >= 0, (key, p)
        assert p["input_dependence"] is None or math.isfinite(p["input_dependence"]), p
        assert [layer["layer"] for layer in p["layers"]] == [0, 1], p  # the tiny config's TTT
    expect(page.locator("#ttt-empty")).to_be_hidden()
    expect(page.locator("#ttt-frames")).not_to_have_text("—")
    px = plot_pixels(page)
    assert px["painted"] > 0 and px["inner_loss_after"] > 20 and px["drift"] > 20, px
    # drawn first, the loss before the update is hidden where it equals the loss after it
    if any(abs(p["inner_loss_before"] - p["inner_loss_after"]) > 0.02 * p["inner_loss_after"]
           for p in points):
        assert px["inner_loss_before"] > 20, (px, points)
    return points


def test_talk_in_pcm_mode_and_disconnect(page, srv, heard, capsys):
    s = talk(page, srv, heard, "pcm")
    assert s["mode"] == "pcm" and s["session"]
    points = check_session_telemetry(page, s["session"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "browser-client.png"
    page.screenshot(path=str(shot), full_page=True)
    plot = ARTIFACTS / "browser-ttt-plot.png"
    page.locator(".ttt").screenshot(path=str(plot))
    with capsys.disabled():  # shown even under -q, without -s
        print(f"\n[screenshots of the connected page: {shot}, its TTT plot ({len(points)} "
              f"points): {plot}]")
    disconnect(page, srv)
    assert stats(page)["closeCode"] == 1000


def test_talk_in_opus_mode(page, srv, heard):
    from playwright.sync_api import expect

    expect(page.locator('#encoding option[value="opus"]')).to_be_enabled(timeout=10_000)
    errors_before = metric(srv, "moshi_ttt_errors_total")
    # Ogg/Opus both ways: our muxer into sphn's reader, sphn's writer into our demuxer
    talk(page, srv, heard, "opus")
    disconnect(page, srv)
    assert metric(srv, "moshi_ttt_errors_total") == errors_before


# -- the page against a scripted server (no model): what a real server rarely does ---------------

class ScriptedServer:
    """The browser client's files, a minimal /health and a `WS /api/chat` that runs
    `self.script(ws)` (set by each test); `open` counts the sockets open now. Starts in a
    second, where the real server's fixture calibrates a codec first."""

    def __init__(self) -> None:
        import asyncio

        from starlette.applications import Starlette
        from starlette.responses import FileResponse, JSONResponse
        from starlette.routing import Mount, Route, WebSocketRoute
        from starlette.staticfiles import StaticFiles

        web = REPO / "client" / "web"
        self.open = 0
        self.opened = 0
        self.script = None

        async def index(request):
            return FileResponse(web / "index.html")

        async def health(request):
            return JSONResponse({"status": "ok", "device": "cpu", "dtype": "float32",
                                 "sessions": {"active": self.open, "capacity": 2}})

        async def chat(ws):
            await ws.accept()
            self.open += 1
            self.opened += 1
            try:
                await self.script(ws, self.opened)
            except asyncio.CancelledError:
                raise
            except Exception:  # the page went away mid-script
                pass
            finally:
                self.open -= 1

        self.app = Starlette(routes=[Route("/", index), Route("/health", health),
                                     WebSocketRoute("/api/chat", chat),
                                     Mount("/static", StaticFiles(directory=web))])

    def __enter__(self) -> "ScriptedServer":
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def until_client_leaves(ws) -> None:
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


def session_hello(n: int) -> list[bytes]:
    from moshi_ttt import protocol

    return [protocol.HANDSHAKE, protocol.metadata(
        {"type": "session", "session": f"s{n}", "slot": 0, "mode": "pcm",
         "telemetry_every": 0})]


@pytest.fixture(scope="module")
def scripted():
    with ScriptedServer() as s:
        yield s


@pytest.fixture
def scripted_page(browser, scripted):
    ctx = browser.new_context(viewport={"width": 1280, "height": 720})
    pg = ctx.new_page()
    problems: list[str] = []
    warnings: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
          if m.type == "error" else warnings.append(m.text) if m.type == "warning" else None)
    pg.goto(scripted.http("/"))
    pg.warnings = warnings
    yield pg
    ctx.close()
    assert not problems, problems


def test_disconnect_clicked_twice_then_connect_keeps_the_new_session(scripted, scripted_page):
    """A second click on Disconnect while the socket closes ends the session on the page at
    once, so Connect can start the next one; the first socket's close event, which comes
    later, used to end the new session on the page (button back to Connect, `session` null)
    while its microphone and server slot stayed open: a click then opened a second one."""
    from playwright.sync_api import expect

    async def talk(ws, n):
        for msg in session_hello(n):
            await ws.send_bytes(msg)
        await until_client_leaves(ws)

    scripted.script = talk
    page = scripted_page
    page.click("#connect")
    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=30_000)
    expect(page.locator("#session-info")).to_contain_text("session s")
    first = scripted.opened
    # Disconnect, Disconnect again (the socket is still closing), Connect: in one task, so
    # the first socket's close event comes after all three
    page.evaluate("() => { const b = document.querySelector('#connect'); "
                  "b.click(); b.click(); b.click(); }")
    expect(page.locator("#session-info")).to_contain_text(f"session s{first + 1}",
                                                          timeout=30_000)
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    page.wait_for_timeout(500)  # the first socket's close event has come by now
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    expect(page.locator("#connect")).to_have_text("Disconnect")
    assert scripted.open == 1
    page.click("#connect")  # ends the new session, does not open another
    expect(page.locator("#status-text")).to_contain_text("Closed (1000", timeout=30_000)
    expect(page.locator("#connect")).to_have_text("Connect")
    deadline = time.monotonic() + 10
    while scripted.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scripted.open == 0 and scripted.opened == first + 1


def test_unreadable_metadata_is_ignored_not_fatal(scripted, scripted_page):
    """METADATA that is not a JSON object (null, a list, not JSON) is skipped with a console
    warning; the conversation goes on (a null used to end it with a TypeError)."""
    from playwright.sync_api import expect

    from moshi_ttt.protocol import Kind, text

    async def odd(ws, n):
        await ws.send_bytes(session_hello(n)[0])
        for payload in (b"null", b"[1, 2]", b"{not json"):
            await ws.send_bytes(bytes([Kind.METADATA]) + payload)
        await ws.send_bytes(session_hello(n)[1])
        await ws.send_bytes(text("hello"))
        await until_client_leaves(ws)

    scripted.script = odd
    page = scripted_page
    page.click("#connect")
    expect(page.locator("#transcript")).to_have_text("hello", timeout=30_000)
    expect(page.locator("#session-info")).to_contain_text(f"session s{scripted.opened}")
    s = stats(page)
    assert s["state"] == "live" and s["errors"] == [], s
    expect(page.locator("#error")).to_be_hidden()
    assert sum("ignored METADATA that is not a JSON object" in w for w in page.warnings) == 3, \
        page.warnings
    page.click("#connect")
    expect(page.locator("#status-text")).to_contain_text("Closed (1000", timeout=30_000)
