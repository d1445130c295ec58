"""The server against a real uvicorn on loopback: protocol, batching and isolation of sessions,
refusals, every kind of bad input, start-up checks, health and metrics, SIGTERM."""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import sphn
import torch

from moshi_ttt.process_memory import native_heap
from moshi_ttt.protocol import FRAME_SIZE, Close, Kind
from server.loadtest import free_port
from server.settings import ServeSettings

from conftest import REPO
from fixtures import make_tiny_base
from serving import (
    Peer, ServerThread, get_json, serve_cmd, serve_env, settings, text_head_in_vocab,
    user_codes, wait_idle,
)

K = 16  # the tiny config's TTT mini-batch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def srv(base):
    with ServerThread(settings(base)) as s:
        text_head_in_vocab(s)
        yield s


# -- protocol ----------------------------------------------------------------------------------

def test_handshake_then_metadata(srv):
    with Peer(srv.url(mode="tokens")) as p:
        kinds = [k for k, _ in p.messages[:2]]
        assert kinds == [Kind.HANDSHAKE, Kind.METADATA]
        assert p.messages[0][1] == b"\x00\x00"  # version 0, model 0
        meta = p.metadata
        assert meta["mode"] == "tokens" and meta["sample_rate"] == 24000
        assert meta["frame_size"] == FRAME_SIZE and meta["slot"] in (0, 1)
        assert meta["max_buffered_frames"] == 50


def test_permessage_deflate_is_declined(srv):
    """A client offering compression (websockets' and moshi's clients do by default) gets plain
    frames: audio does not compress, and each connection's zlib state cost native memory."""
    from websockets.sync.client import connect

    with connect(srv.url(mode="tokens")) as ws:
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        assert ws.protocol.extensions == []
        assert ws.recv(timeout=30)[:1] == bytes([Kind.HANDSHAKE])


def test_tokens_mode_one_answer_per_frame_and_text(srv):
    n = 40
    with Peer(srv.url(mode="tokens")) as p:
        p.send_codes(user_codes(n, 1))
        out = p.wait_codes(n)
        assert out.shape == (n, 9)
        assert (out[0] == -2).all()  # the model's delay: one frame before anything is generated
        assert (out[1:] >= 0).all() and (out[1:, 1:] < 2048).all()
        tok = srv.host.loaded.tokenizer
        pieces = [tok.id_to_piece(int(t)).replace("\u2581", " ")
                  for t in out[1:, 0] if t not in (0, 3) and not tok.is_control(int(t))]
        p.wait_for(lambda: len(p.of(Kind.TEXT)) >= len(pieces))
        assert [t.decode() for t in p.of(Kind.TEXT)] == pieces and "".join(pieces).strip()


def test_pcm_audio_out_for_audio_in(srv):
    n = 12
    pcm = (np.random.default_rng(0).standard_normal(n * FRAME_SIZE) * 0.1).astype(np.float32)
    with Peer(srv.url(mode="pcm")) as p:
        for chunk in np.array_split(pcm, 7):  # any chunking is re-framed into 1920 samples
            p.send_pcm(chunk)
        p.wait_for(lambda: len(p.of(Kind.AUDIO)) >= n - 1)
        time.sleep(0.3)
        audio = p.of(Kind.AUDIO)
        assert len(audio) == n - 1  # frame counts match up to the model delay (1 frame)
        out = np.frombuffer(b"".join(audio), dtype="<f4")
        assert out.size == (n - 1) * FRAME_SIZE and np.isfinite(out).all() and out.std() > 0


def test_opus_audio_out_for_audio_in(srv):
    n = 12
    writer = sphn.OpusStreamWriter(24000)
    t = np.arange(n * FRAME_SIZE) / 24000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    with Peer(srv.url(mode="opus")) as p:
        for i in range(n):
            data = writer.append_pcm(pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
            if data:
                p.send(Kind.AUDIO, data)
        reader = sphn.OpusStreamReader(24000)
        decoded = []

        def enough():
            for page in p.of(Kind.AUDIO)[len(decoded):]:
                decoded.append(reader.append_bytes(page))
            return sum(d.size for d in decoded) >= (n - 3) * FRAME_SIZE
        p.wait_for(enough)
        assert not p.errors


# -- sessions ----------------------------------------------------------------------------------

def _run_alone(srv, codes, hold_slot0: bool) -> np.ndarray:
    """One session's outputs when it runs by itself (optionally in slot 1, with slot 0 held by
    an idle session that sends nothing)."""
    holder = Peer(srv.url(mode="tokens")).__enter__() if hold_slot0 else None
    try:
        with Peer(srv.url(mode="tokens")) as p:
            assert p.metadata["slot"] == (1 if hold_slot0 else 0)
            for i in range(0, len(codes), 5):  # paced: the input queue is bounded
                p.send_codes(codes[i:i + 5])
                p.wait_codes(min(i + 5, len(codes)))
            out = p.codes_out()
            assert len(out) == len(codes), (p.close_code, p.errors)
            return out
    finally:
        if holder:
            holder.__exit__()
        wait_idle(srv)


def test_concurrent_sessions_equal_each_alone_and_keep_their_own_ttt_state(srv):
    n = 3 * K + 5
    a_in, b_in = user_codes(n, 10), user_codes(n, 11)
    wait_idle(srv)
    a_alone = _run_alone(srv, a_in, hold_slot0=False)
    b_alone = _run_alone(srv, b_in, hold_slot0=True)
    assert not np.array_equal(a_alone, b_alone)

    with Peer(srv.url(mode="tokens")) as a, Peer(srv.url(mode="tokens")) as b:
        assert (a.metadata["slot"], b.metadata["slot"]) == (0, 1)
        rng = np.random.default_rng(0)
        ia = ib = 0
        while ia < n or ib < n:  # interleave irregularly: steps batch both, one, or the other
            if ia < n and rng.random() < 0.5:
                k = int(rng.integers(1, 4))
                a.send_codes(a_in[ia:ia + k])
                ia += k
            if ib < n and rng.random() < 0.5:
                k = int(rng.integers(1, 4))
                b.send_codes(b_in[ib:ib + k])
                ib += k
            time.sleep(float(rng.random()) * 0.02)
        a_out, b_out = a.wait_codes(n), b.wait_codes(n)

        def fast_weights_moved():
            st = [blk._streaming_state for blk in srv.engine._blocks]
            w0 = st[0].w0().w1
            return [float((s.w.w1[r] - w0).abs().max()) for s in st for r in (0, 1)]
        moved = srv.engine.submit(fast_weights_moved).result(timeout=30)
    np.testing.assert_array_equal(a_out, a_alone)
    np.testing.assert_array_equal(b_out, b_alone)
    assert all(m > 0 for m in moved)  # both sessions' TTT states learned online


def _send_paced(sends: list[tuple[Peer, np.ndarray, int, int]]) -> None:
    """Each (peer, codes, start, stop): frames start .. stop - 1, 5 at a time, the peers
    interleaved, each round answered before the next (the input queue is bounded)."""
    for j in range(0, max(stop - start for _, _, start, stop in sends), 5):
        for p, c, start, stop in sends:
            if start + j < stop:
                p.send_codes(c[start + j:min(start + j + 5, stop)])
        for p, _, start, stop in sends:
            p.wait_codes(min(start + j + 5, stop))


def test_sessions_joining_and_leaving_across_row_buckets_equal_each_alone(base):
    """Capacity 4, so a step runs 1, 2 or 4 rows: A, B and C join (rows 0-2: 4-row steps),
    A leaves (C moves into row 0), D joins (row 2), B and D leave, C finishes alone (1-row
    steps). Each session's outputs equal those of its input streamed alone, over TTT
    mini-batch commits (every K = 16 frames)."""
    ins = {"A": user_codes(10, 30), "B": user_codes(25, 31), "C": user_codes(35, 32),
           "D": user_codes(15, 33)}
    with ServerThread(settings(base, max_sessions=4)) as srv:
        alone = {k: _run_alone(srv, v, hold_slot0=False) for k, v in ins.items()}
        assert not np.array_equal(alone["A"], alone["B"][:10])
        eng = srv.engine
        moves0, steps0 = eng.moves, eng.steps

        def wait(pred) -> None:
            deadline = time.monotonic() + 30
            while not pred():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        a = Peer(srv.url(mode="tokens")).__enter__()
        b = Peer(srv.url(mode="tokens")).__enter__()
        c = Peer(srv.url(mode="tokens")).__enter__()
        d = None
        try:
            assert [p.metadata["slot"] for p in (a, b, c)] == [0, 1, 2]
            _send_paced([(a, ins["A"], 0, 10), (b, ins["B"], 0, 10), (c, ins["C"], 0, 10)])
            a.__exit__()
            wait(lambda: eng.moves > moves0)  # C moved into A's row
            assert eng.slots.held() == [0, 1]
            d = Peer(srv.url(mode="tokens")).__enter__()
            assert d.metadata["slot"] == 2
            _send_paced([(b, ins["B"], 10, 25), (c, ins["C"], 10, 25), (d, ins["D"], 0, 15)])
            b.__exit__()
            d.__exit__()
            wait(lambda: eng.active == 1)
            _send_paced([(c, ins["C"], 25, 35)])
            out = {k: p.codes_out() for k, p in zip("ABCD", (a, b, c, d))}
        finally:
            for p in (a, b, c, d):
                if p is not None:
                    p.__exit__()
        wait_idle(srv)
        rows = [r for _, _, r in list(eng.recent)[-(eng.steps - steps0):]]
        _, health = get_json(srv.http("/health"))
    for k in "ABCD":
        np.testing.assert_array_equal(out[k], alone[k], err_msg=k)
    assert {1, 4} <= set(rows), sorted(set(rows))
    assert health["engine"]["buckets"] == [1, 2, 4]
    assert health["engine"]["row_moves"] >= 1


def test_refusal_at_capacity_says_so(base):
    with ServerThread(settings(base, max_sessions=1)) as srv:
        with Peer(srv.url(mode="tokens")):
            with Peer(srv.url(mode="tokens"), handshake=False) as late:
                late.wait_closed()
            assert late.close_code == Close.TRY_AGAIN
            assert late.errors and "all 1 session slots are taken" in late.errors[0]
            assert not late.of(Kind.HANDSHAKE)
        metrics = urllib.request.urlopen(srv.http("/metrics")).read().decode()
        assert 'moshi_ttt_sessions_refused_total{reason="capacity"} 1.0' in metrics


def _ready(srv) -> tuple[int, dict, str | None]:
    try:
        with urllib.request.urlopen(srv.http("/health/ready"), timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers.get("Retry-After")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers.get("Retry-After")


def test_readiness_follows_free_slots_and_liveness_answers(base):
    """/health/ready is what a load balancer or a Kubernetes readiness probe reads: 503 with
    Retry-After while every slot is taken, 200 again once one is freed."""
    with ServerThread(settings(base, max_sessions=1)) as srv:
        status, body, _ = _ready(srv)
        assert status == 200 and body["ready"] and body["free"] == 1
        with Peer(srv.url(mode="tokens")):
            status, body, retry = _ready(srv)
            assert status == 503 and not body["ready"] and body["free"] == 0
            assert "all 1 session slots are taken" in body["reason"] and retry == "1"
            assert get_json(srv.http("/health"))[0] == 200  # healthy, only full
        wait_idle(srv)
        status, body, _ = _ready(srv)
        assert status == 200 and body["free"] == 1
        assert get_json(srv.http("/health/live")) == (200, {"status": "alive", "model": "ok"})


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,message,code,match", [
    ("tokens", b"\x63hello", Close.UNSUPPORTED, "unknown message kind 99"),
    ("tokens", b"", Close.UNSUPPORTED, "empty message"),
    ("opus", b"\x01" + b"this is not ogg" * 10, Close.INVALID, "malformed Ogg/Opus"),
    ("pcm", b"\x01" + b"\x00" * 7, Close.INVALID, "not a whole number of float32"),
    ("pcm", b"\x01" + np.array([0.1, np.nan], "<f4").tobytes(), Close.INVALID, "NaN"),
    ("tokens", b"\x07" + np.full(8, 5000, "<i4").tobytes(), Close.INVALID, "out of range"),
    ("tokens", b"\x07" + np.zeros(5, "<i4").tobytes(), Close.INVALID, "frames of 8 int32"),
    ("tokens", b"\x01" + b"\x00" * 16, Close.UNSUPPORTED, "not accepted in tokens mode"),
    ("pcm", b"\x07" + np.zeros(8, "<i4").tobytes(), Close.UNSUPPORTED, "need tokens mode"),
    ("tokens", b"\x02hi", Close.UNSUPPORTED, "sent by the server"),
])
def test_bad_messages_end_only_that_session(srv, mode, message, code, match):
    with Peer(srv.url(mode="tokens")) as good, Peer(srv.url(mode=mode)) as bad:
        good.send_codes(user_codes(3, 5))
        if message:
            bad.ws.send(message)
        else:
            bad.ws.send(b"")
        bad.wait_closed()
        assert bad.close_code == code, bad.errors
        assert len(bad.errors) == 1 and match in bad.errors[0]
        good.send_codes(user_codes(3, 6))
        assert len(good.wait_codes(6)) == 6 and not good.closed  # the other session goes on
    wait_idle(srv)


def test_text_frames_and_oversized_messages(base):
    with ServerThread(settings(base, max_message_bytes=4096)) as srv:
        with Peer(srv.url(mode="pcm")) as p:
            p.ws.send("hello")
            p.wait_closed()
        assert p.close_code == Close.UNSUPPORTED and "text websocket frames" in p.errors[0]
        with Peer(srv.url(mode="pcm")) as p:
            p.send_pcm(np.zeros(2000, np.float32))  # 8 kB > 4 kB
            p.wait_closed()
        assert p.close_code == Close.TOO_BIG and "over the limit of 4096 bytes" in p.errors[0]
        with Peer(srv.url(mode="pcm")) as p:  # far beyond: uvicorn's own limit closes it
            p.send_pcm(np.zeros(40000, np.float32))
            p.wait_closed()
        assert p.close_code == Close.TOO_BIG


def test_client_faster_than_the_model_is_told_and_closed(base):
    with ServerThread(settings(base, max_buffered_frames=4)) as srv:
        blocker = threading.Event()
        with Peer(srv.url(mode="tokens")) as p:
            srv.engine.submit(lambda: blocker.wait(10))
            p.send_codes(user_codes(10, 0))  # 10 frames while the model is busy
            p.wait_closed()
            blocker.set()
        assert p.close_code == Close.POLICY
        assert "input buffer full" in p.errors[0] and "limit 4" in p.errors[0]
        wait_idle(srv)


def test_abrupt_disconnect_mid_frame_frees_the_slot(srv):
    wait_idle(srv)
    p = Peer(srv.url(mode="pcm")).__enter__()
    p.send_pcm(np.zeros(FRAME_SIZE + 700, np.float32))  # one frame and a half
    time.sleep(0.2)
    p.ws.socket.shutdown(socket.SHUT_RDWR)  # no close handshake
    p.ws.socket.close()
    wait_idle(srv)
    with Peer(srv.url(mode="tokens")) as q:
        assert q.metadata["slot"] == 0
        q.send_codes(user_codes(2, 0))
        assert len(q.wait_codes(2)) == 2


def test_nonfinite_ttt_state_closes_that_session_others_unchanged(srv):
    n = 2 * K
    b_in = user_codes(n, 21)
    wait_idle(srv)
    b_ref = _run_alone(srv, b_in, hold_slot0=True)
    with Peer(srv.url(mode="tokens")) as a, Peer(srv.url(mode="tokens")) as b:
        a.send_codes(user_codes(3, 20))
        a.wait_codes(3)

        def poison():  # a diverged session: NaN in slot 0's fast weights
            srv.engine._blocks[0]._streaming_state.w.w1[0].fill_(float("nan"))
        srv.engine.submit(poison).result(timeout=30)
        a.send_codes(user_codes(1, 22))
        for i in range(0, n, 8):
            b.send_codes(b_in[i:i + 8])
            b.wait_codes(i + 8)
        a.wait_closed()
        assert a.close_code == Close.INTERNAL and "TTT state diverged" in a.errors[0]
        np.testing.assert_array_equal(b.wait_codes(n), b_ref)
    wait_idle(srv)
    # the slot is clean for the next session: same outputs as a session that never saw NaN
    a2 = _run_alone(srv, b_in, hold_slot0=False)
    b_slot0 = _run_alone(srv, b_in, hold_slot0=False)
    np.testing.assert_array_equal(a2, b_slot0)
    metrics = urllib.request.urlopen(srv.http("/metrics")).read().decode()
    assert 'moshi_ttt_errors_total{kind="nonfinite_ttt_state"} 1.0' in metrics


def test_bad_sessions_leave_nothing_behind(srv):
    wait_idle(srv)

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def once(i):
        with Peer(srv.url(mode="pcm")) as p:
            p.send_pcm(np.zeros(FRAME_SIZE, np.float32))
            p.ws.send(b"\x63" if i % 2 else b"\x01garbage")
            p.wait_closed()
    for i in range(5):
        once(i)
    before = rss_mb()
    for i in range(30):
        once(i)
    wait_idle(srv)
    deadline = time.monotonic() + 10
    while srv.host.sessions and time.monotonic() < deadline:  # the last close is in flight
        time.sleep(0.02)
    assert srv.engine._handles == {} and srv.engine.slots.active == 0
    assert not srv.host.sessions
    assert rss_mb() - before < 50  # peak RSS: no per-session growth


# -- access --------------------------------------------------------------------------------------

def test_api_key_and_origin(base):
    s = settings(base, api_key="s3cret", allowed_origins=["http://good.example"])
    with ServerThread(s) as srv:
        with Peer(srv.url(mode="tokens"), handshake=False) as p:
            p.wait_closed()
        assert p.close_code == Close.POLICY and "API key" in p.errors[0]
        with Peer(srv.url(mode="tokens", api_key="s3cret"),
                  headers={"Origin": "http://evil.example"}, handshake=False) as p:
            p.wait_closed()
        assert p.close_code == Close.POLICY and "origin" in p.errors[0]
        for url, headers in ((srv.url(mode="tokens", api_key="s3cret"), {}),
                             (srv.url(mode="tokens"), {"X-API-Key": "s3cret"}),
                             (srv.url(mode="tokens"), {"Authorization": "Bearer s3cret",
                                                       "Origin": "http://good.example"})):
            with Peer(url, headers=headers) as p:
                assert p.metadata["mode"] == "tokens"


def test_unknown_mode_is_refused(srv):
    with Peer(srv.url(mode="mp3"), handshake=False) as p:
        p.wait_closed()
    assert p.close_code == Close.POLICY and "unknown mode 'mp3'" in p.errors[0]


# -- health and metrics ------------------------------------------------------------------------

def test_health_reports_the_checkpoints_dims(srv, base):
    from moshi_ttt.checkpoint import inspect_checkpoint

    status, h = get_json(srv.http("/health"))
    assert status == 200 and h["status"] == "ok"
    ref = inspect_checkpoint(base)
    for key in ("main", "depformer", "ttt", "params", "streams"):
        assert h["model"][key] == ref[key], key
    assert h["model"]["main"]["d_model"] == 64 and h["model"]["ttt"]["layers"] == [0, 1]
    assert h["codec"] == {"sample_rate": 24000, "frame_rate": 12.5, "frame_size": 1920,
                          "codebooks": 8, "card": 2048}
    assert h["device"] == "cpu" and h["dtype"] == "float32"
    assert h["sessions"]["capacity"] == 2
    assert h["checkpoint"]["path"] == str(base) and h["checkpoint"]["kind"] == "base"
    mem = h["memory"]
    assert mem["rss_mb"] > 0
    if native_heap() is not None:  # glibc: the heap in use is less than what is resident
        assert 0 < mem["heap_in_use_mb"] < mem["rss_mb"] and mem["heap_free_mb"] >= 0


def test_health_is_503_until_ready_and_chat_is_refused(base):
    from server.app import ModelHost

    gate = threading.Event()

    class SlowHost(ModelHost):
        def load(self):
            gate.wait(30)
            super().load()

    s = settings(base)
    with ServerThread(s, host=SlowHost(s), wait_ready=False) as srv:
        status, h = get_json(srv.http("/health"))
        assert status == 503 and h["status"] == "starting" and h["reason"]
        code, body, _ = _ready(srv)
        assert code == 503 and body["reason"].startswith("model not ready (starting)")
        assert get_json(srv.http("/health/live"))[0] == 200  # alive while it loads
        with Peer(srv.url(mode="tokens"), handshake=False) as p:
            p.wait_closed()
        assert p.close_code == Close.TRY_AGAIN and "model not ready" in p.errors[0]
        gate.set()
        deadline = time.monotonic() + 60
        while get_json(srv.http("/health"))[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_metrics_count_frames_and_latency(srv):
    before = urllib.request.urlopen(srv.http("/metrics")).read().decode()
    with Peer(srv.url(mode="tokens")) as p:
        p.send_codes(user_codes(5, 0))
        p.wait_codes(5)
    text = urllib.request.urlopen(srv.http("/metrics")).read().decode()

    def value(t, name):
        return float(next(l.split()[-1] for l in t.splitlines() if l.startswith(name + " ")))
    assert value(text, "moshi_ttt_frames_total") - value(before, "moshi_ttt_frames_total") == 5
    assert value(text, "moshi_ttt_step_seconds_count") >= 1
    for name in ("moshi_ttt_sessions_active", "moshi_ttt_sessions_capacity",
                 "moshi_ttt_step_seconds_bucket"):
        assert name in text


# -- the process: start-up refusal, SIGTERM ------------------------------------------------------

def test_startup_refuses_a_mismatched_checkpoint_before_binding(base, tmp_path):
    import shutil

    from moshi_ttt.base import resolve_base
    from moshi_ttt.checkpoint import save_checkpoint
    from moshi_ttt.config import load_config
    from moshi_ttt.dims import detect_dims
    from moshi_ttt.model import build_ttt_lm

    cfg = load_config(base / "moshi_ttt.yaml")
    lm = build_ttt_lm(cfg)
    tensors = {k: v for k, v in lm.state_dict().items() if ".ttt." in k}
    tensors["transformer.layers.1.ttt.wq.weight"] = torch.zeros(32, 64)  # wrong shape
    cfg.base.local_dir = str(base)
    run = tmp_path / "run"
    save_checkpoint(run, 1, tensors, cfg, resolve_base(cfg.base), detect_dims(lm))
    port = free_port()
    r = subprocess.run(serve_cmd(run, port), cwd=REPO, env=serve_env(), capture_output=True,
                       text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "transformer.layers.1.ttt.wq.weight" in out and "(64, 64)" in out \
        and "(32, 64)" in out, out
    assert "Uvicorn running" not in out and "listening on" not in out

    bad_base = tmp_path / "bad_base"  # config.json claims another width than the weights
    shutil.copytree(base, bad_base)
    c = json.loads((bad_base / "config.json").read_text())
    c["dim"] = 128
    (bad_base / "config.json").write_text(json.dumps(c))
    r = subprocess.run(serve_cmd(bad_base, port), cwd=REPO, env=serve_env(), capture_output=True,
                       text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "text_emb.weight" in out and "128" in out, out

    r = subprocess.run(serve_cmd(tmp_path / "nowhere", port), cwd=REPO, env=serve_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stdout + r.stderr


def test_sigterm_closes_sessions_with_a_reason_and_exits_0(base):
    port = free_port()
    proc = subprocess.Popen(serve_cmd(base, port), cwd=REPO, env=serve_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if get_json(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with Peer(f"ws://127.0.0.1:{port}/api/chat?mode=tokens") as p:
            p.send_codes(user_codes(2, 0))
            p.wait_codes(2)
            proc.send_signal(signal.SIGTERM)
            p.wait_closed()
        assert p.close_code == Close.GOING_AWAY and p.errors == ["server shutting down"]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# -- robustness of the engine ------------------------------------------------------------------

def test_depformer_ttt_config_serves(tmp_path):
    """TTT blocks in the depformer (moshi streams it per step, so they hold no state between
    frames) must not trip the engine's per-step health check."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["ttt"]["depformer_layers"] = [0]
    path = tmp_path / "dep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = ServeSettings(random_config=path, max_sessions=1, use_sampling=False, warmup_frames=1,
                      cpu_threads=None)
    with ServerThread(s) as srv:
        assert get_json(srv.http("/health"))[1]["model"]["ttt"]["depformer_layers"] == [0]
        with Peer(srv.url(mode="tokens")) as p:
            p.send_codes(user_codes(4, 0))
            assert len(p.wait_codes(4)) == 4 and not p.errors


def test_silent_session_is_closed_after_the_idle_timeout(base):
    with ServerThread(settings(base, idle_timeout_s=0.5)) as srv:
        with Peer(srv.url(mode="tokens")) as p:
            p.wait_closed(timeout=10)
        assert p.close_code == Close.POLICY and "no audio for 0.5 s" in p.errors[0]
        wait_idle(srv)


def test_a_dead_model_thread_fails_sessions_and_health(base):
    with ServerThread(settings(base)) as srv:
        with Peer(srv.url(mode="tokens")) as p:
            def broken(*a, **kw):
                raise RuntimeError("simulated device failure")
            srv.engine._take = broken
            p.send_codes(user_codes(1, 0))  # wakes the thread, which now dies
            p.wait_closed()
        assert p.close_code == Close.INTERNAL
        assert "model thread stopped" in p.errors[0] and "simulated device failure" in p.errors[0]
        status, h = get_json(srv.http("/health"))
        assert status == 503 and h["status"] == "failed" and "simulated" in h["reason"]
        with Peer(srv.url(mode="tokens"), handshake=False) as q:
            q.wait_closed()
        assert q.close_code == Close.TRY_AGAIN and "model not ready (failed)" in q.errors[0]


def test_engine_stop_cancels_queued_tasks(base):
    import concurrent.futures

    from moshi_ttt.checkpoint import load_model
    from server.engine import Engine, EngineConfig

    m = load_model(base, with_codec=False)
    eng = Engine(m.lm, None, EngineConfig(capacity=1))
    eng.start()
    gate = threading.Event()
    first = eng.submit(lambda: gate.wait(10))
    time.sleep(0.2)  # the model thread is inside `first`
    second = eng.submit(lambda: 42)
    stopper = threading.Thread(target=eng.stop)
    stopper.start()
    time.sleep(0.2)
    gate.set()
    stopper.join(timeout=30)
    assert first.result(timeout=5) is True
    with pytest.raises(concurrent.futures.CancelledError):
        second.result(timeout=5)


def test_api_keys_are_redacted_from_log_lines():
    import logging

    from server.main import RedactKeys

    rec = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1,
                            '%s - "WebSocket %s" [accepted]',
                            ("127.0.0.1:5", "/api/chat?mode=pcm&api_key=s3cret&x=1"), None)
    RedactKeys().filter(rec)
    assert "s3cret" not in rec.getMessage() and "api_key=***&x=1" in rec.getMessage()
