"""Step cost follows occupancy (issue 15, item 1): the engine steps only the smallest bucket of
rows that holds its sessions, sessions stay in the first rows (a session moves to a lower row
when one below it leaves), and none of this changes a single output bit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from moshi_ttt.protocol import FRAME_SIZE, NUM_CODEBOOKS

from conftest import CONFIGS

TINY = CONFIGS / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _engine(capacity: int, codec: bool, **kw):
    from moshi_ttt.checkpoint import random_model
    from server.engine import Engine, EngineConfig

    m = random_model(TINY, with_codec=codec)
    with torch.no_grad():
        for a in m.lm.transformer.layers:  # a visible TTT contribution to every output
            if getattr(a, "ttt", None) is not None:
                a.ttt.gate_alpha.fill_(1.0)
    kw.setdefault("use_sampling", False)
    kw.setdefault("batch_wait_s", 0.05)
    return Engine(m.lm, m.mimi, EngineConfig(capacity=capacity, **kw))


# -- buckets and the per-row tensors -----------------------------------------------------------

def test_buckets_are_powers_of_two_up_to_capacity():
    from server.rows import buckets_for

    assert buckets_for(1) == [1]
    assert buckets_for(2) == [1, 2]
    assert buckets_for(8) == [1, 2, 4, 8]
    assert buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(32) == [1, 2, 4, 8, 16, 32]


def test_per_row_tensors_are_found_with_their_batch_dim():
    """At capacity 2 the KV cache's first dim (keys/values) also has size 2: its batch dim is
    moshi's dim 1; LMGen's initial tokens are shared; every state's exec mask is per row."""
    from moshi.modules.streaming import State, StreamingModule
    from moshi.modules.transformer import RingKVCache

    from moshi_ttt.block import TTTState

    eng = _engine(2, codec=True)
    leaves = {(type(x.owner).__name__, x.name): x.dim for x in eng.rows.leaves}
    kv = [x for x in eng.rows.leaves if isinstance(x.owner, RingKVCache) and x.name == "cache"]
    assert kv and all(x.dim == 1 for x in kv)
    assert leaves[("_LMGenState", "cache")] == 0 and leaves[("_LMGenState", "offsets")] == 0
    assert ("_LMGenState", "initial") not in leaves
    for name in ("w1", "b1", "w2", "b2"):
        assert leaves[("FastWeights", name)] == 0
    for name in ("xk", "x2", "gz1", "gz2", "lr"):
        assert leaves[("MiniBatchBuffer", name)] == 0
    for name in ("pos", "nonfinite", "telemetry"):
        assert leaves[("TTTState", name)] == 0
    assert leaves[("_StreamingConv1dState", "previous")] == 0  # q/k convs and Mimi's
    assert leaves[("_StreamingConvTr1dState", "partial")] == 0
    states = [m._streaming_state for root in (eng.lm_gen, eng.mimi) for m in root.modules()
              if isinstance(m, StreamingModule) and m._streaming_state is not None]
    owners = {id(x.owner) for x in eng.rows.leaves if x.name == "exec_mask"}
    assert all(id(s) in owners for s in states if isinstance(s, State))
    assert sum(isinstance(s, TTTState) for s in states) == 2  # the tiny config's TTT layers


def test_a_bucket_steps_views_of_the_full_state_and_restores_it():
    eng = _engine(4, codec=False)
    blk = eng._blocks[0]
    full = blk._streaming_state
    with eng.rows.prefix(2):
        st = blk._streaming_state
        assert st is not full and st.batch_size == 2 and st.w.w1.shape[0] == 2
        assert st.w.w1.data_ptr() == full.w.w1.data_ptr()  # same storage: nothing copied
        kv = eng.lm.transformer.layers[0].self_attn._streaming_state.kv_cache.cache
        assert kv.shape[1] == 2
    assert blk._streaming_state is full
    with pytest.raises(ValueError, match="not a bucket"):
        with eng.rows.prefix(3):
            pass


# -- moving a session ---------------------------------------------------------------------------

def _state_rows(eng, row: int) -> list[torch.Tensor]:
    return [x.tensor.select(x.dim, row).clone() for x in eng.rows.leaves]


def _audio_step(eng, pcm: np.ndarray, active: list[bool]):
    """One step of rows 0 .. len(active) - 1, audio in and out for the active ones."""
    n = len(active)
    ready = torch.tensor(active)
    out, audio, bad, _ = eng._step_tensors(
        torch.from_numpy(pcm[:n])[:, None], torch.zeros(n, NUM_CODEBOOKS, 1, dtype=torch.long),
        ready, ready, ready)
    assert not bool(bad.any())
    return out.numpy().copy(), audio.numpy().copy()


def _four_sessions(eng, pcm: np.ndarray) -> None:
    """Every row reset, then four audio sessions for 20 frames (past a TTT commit at 16)."""
    eng._reset(torch.ones(4, dtype=torch.bool))
    for t in range(20):
        _audio_step(eng, pcm[t], [True] * 4)


def _continue(eng, pcm: np.ndarray, rows: list[int], active: list[bool]):
    """Frames 20-39: row i of the step gets the frames of session rows[i]."""
    outs, audio = [], []
    for t in range(20, 40):
        o, a = _audio_step(eng, pcm[t][rows], active)
        outs.append(o)
        audio.append(a)
    return np.stack(outs), np.stack(audio)


def test_a_moved_session_continues_bit_for_bit():
    """Sessions 1 and 2 end, session 3 moves into row 1. Its next 20 frames of tokens and audio
    and its whole streaming state (KV caches and offsets, TTT fast weights, mini-batch and
    position, q/k convs, LMGen's token cache and offsets, Mimi's buffers) are bit for bit
    those of the same session left in row 3 (the same 4-row step: the same arithmetic)."""
    eng = _engine(4, codec=True)
    eng.warmup(1)
    pcm = (np.random.default_rng(0).standard_normal((40, 4, FRAME_SIZE)) * 0.2).astype(
        np.float32)
    _four_sessions(eng, pcm)  # reference: session 3 stays in row 3, rows 1, 2 exec-masked
    ref_out, ref_audio = _continue(eng, pcm, [0, 1, 2, 3], [True, False, False, True])
    ref_state = (_state_rows(eng, 0), _state_rows(eng, 3))

    _four_sessions(eng, pcm)  # the same session moved into row 1
    eng._reset(torch.tensor([False, True, True, False]))  # sessions 1 and 2 left
    eng.rows.move_row(3, 1)
    eng._reset(torch.tensor([False, False, False, True]))
    # the old row keeps nothing of the session: reset like a fresh row
    w0 = eng._blocks[0].inner.w1.detach()
    assert torch.equal(eng._blocks[0]._streaming_state.w.w1[3], w0)
    for x in eng.rows.leaves:
        if type(x.owner).__name__ == "RingKVCache" and x.name == "cache":
            assert not x.tensor.select(1, 3).any()
    got_out, got_audio = _continue(eng, pcm, [0, 3, 1, 2], [True, True, False, False])
    np.testing.assert_array_equal(got_out[:, [0, 1]], ref_out[:, [0, 3]])
    np.testing.assert_array_equal(got_audio[:, [0, 1]], ref_audio[:, [0, 3]])
    assert (got_out[-1, :2] >= 0).all()  # generated tokens, not placeholders
    for row, want_row in ((0, 0), (1, 1)):
        for leaf, got, want in zip(eng.rows.leaves, _state_rows(eng, row), ref_state[want_row]):
            assert torch.equal(got, want), (type(leaf.owner).__name__, leaf.name)


def test_a_smaller_bucket_gives_the_same_tokens():
    """The same two sessions stepped as 2 rows instead of 4: the same tokens and audio. The
    float state agrees to rounding only: a matrix product's kernel depends on its row count
    (measured: up to ~1e-6 in a KV cache), which greedy tokens do not see."""
    eng = _engine(4, codec=True)
    eng.warmup(1)
    pcm = (np.random.default_rng(1).standard_normal((40, 4, FRAME_SIZE)) * 0.2).astype(
        np.float32)
    _four_sessions(eng, pcm)
    ref_out, ref_audio = _continue(eng, pcm, [0, 1, 2, 3], [True, True, False, False])
    ref_state = (_state_rows(eng, 0), _state_rows(eng, 1))
    _four_sessions(eng, pcm)
    got_out, got_audio = _continue(eng, pcm, [0, 1], [True, True])
    np.testing.assert_array_equal(got_out, ref_out[:, :2])
    np.testing.assert_allclose(got_audio, ref_audio[:, :2], rtol=0, atol=1e-5)
    for row in (0, 1):
        for got, want in zip(_state_rows(eng, row), ref_state[row]):
            if got.is_floating_point():
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(got, want)


# -- sessions joining and leaving across buckets --------------------------------------------------

class _Driver:
    """Sessions on a running engine in lock step: every tick, each open session pushes its
    next frame, and the tick ends when every one has its answer."""

    def __init__(self, eng):
        self.eng = eng
        self.outs: dict[str, list] = {}
        self.handles: dict = {}
        self.frames: dict[str, np.ndarray] = {}
        self.sent: dict[str, int] = {}
        self.slots: dict[str, list[int]] = {}

    def open(self, name: str, frames: np.ndarray) -> None:
        self.outs[name] = []
        self.frames[name], self.sent[name], self.slots[name] = frames, 0, []
        h = self.eng.open(frames.dtype == np.float32, self.outs[name].append)
        h.ready.result(timeout=30)
        self.handles[name] = h

    def close(self, name: str) -> None:
        self.eng.close(self.handles.pop(name))

    def tick(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for name, h in self.handles.items():
                if self.sent[name] < len(self.frames[name]):
                    self.slots[name].append(h.slot)
                    self.eng.push(h, self.frames[name][self.sent[name]])
                    self.sent[name] += 1
            deadline = time.monotonic() + 60
            while any(len(self.outs[n]) < self.sent[n] for n in self.handles):
                assert time.monotonic() < deadline, "no answer within 60 s"
                time.sleep(0.002)

    def result(self, name: str) -> tuple[np.ndarray, list]:
        outs = self.outs[name]
        assert all(hasattr(o, "codes") for o in outs), outs[-1:]
        toks = np.array([np.concatenate([[o.text_token], o.codes]) for o in outs])
        return toks, [o.pcm for o in outs]


def _alone(eng, frames: np.ndarray) -> tuple[np.ndarray, list]:
    d = _Driver(eng)
    d.open("x", frames)
    d.tick(len(frames))
    assert d.slots["x"][0] == 0
    d.close("x")
    return d.result("x")


@pytest.fixture(scope="module")
def running():
    torch.set_num_threads(1)
    eng = _engine(4, codec=True)
    eng.warmup(1)
    eng.start()
    yield eng
    eng.stop()


def test_sessions_joining_and_leaving_across_buckets_equal_each_alone(running):
    """A, B, C join (rows 0-2: a 4-row step), A leaves (C moves to row 0: 2 rows), D joins
    (row 2: 4 rows again), B and D leave (C alone: 1 row), E joins. Audio and token sessions
    mixed. Every session's tokens equal those of its input streamed alone; its audio too, to
    float rounding (the codec's kernels depend on the step's row count: ~1e-7)."""
    eng = running
    rng = np.random.default_rng(7)

    def audio(n):
        return (rng.standard_normal((n, FRAME_SIZE)) * 0.2).astype(np.float32)

    def codes(n):
        return rng.integers(0, 2048, (n, 8))

    inputs = {"A": audio(14), "B": codes(30), "C": audio(44), "D": codes(22), "E": codes(12)}
    alone = {k: _alone(eng, v) for k, v in inputs.items()}
    assert not np.array_equal(alone["B"][0][:12], alone["E"][0])  # inputs matter

    moves0, steps0 = eng.moves, eng.steps
    d = _Driver(eng)
    d.open("A", inputs["A"])
    d.open("B", inputs["B"])
    d.open("C", inputs["C"])
    assert [d.handles[k].slot for k in "ABC"] == [0, 1, 2]
    d.tick(14)
    d.close("A")
    d.tick(2)  # the engine moves C into A's row
    assert (d.handles["B"].slot, d.handles["C"].slot) == (1, 0)
    d.open("D", inputs["D"])
    assert d.handles["D"].slot == 2
    d.tick(14)  # B done (30 frames)
    d.close("B")
    d.tick(8)  # D done
    d.close("D")
    d.tick(2)
    assert d.handles["C"].slot == 0
    d.open("E", inputs["E"])
    d.tick(12)
    d.close("C")
    d.close("E")
    rows = [n for _, _, n in list(eng.recent)[-(eng.steps - steps0):]]
    assert eng.moves - moves0 >= 1
    assert {1, 2, 4} <= set(rows), sorted(set(rows))  # every bucket was stepped
    for name, (toks, pcm) in alone.items():
        got_toks, got_pcm = d.result(name)
        np.testing.assert_array_equal(got_toks, toks, err_msg=name)
        assert len(got_pcm) == len(pcm)
        for g, w in zip(got_pcm, pcm):
            assert (g is None) == (w is None)
            if g is not None:
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=name)
    assert any(p is not None for p in d.result("C")[1])  # audio came back
    assert eng.stats()["row_moves"] == eng.moves


def test_a_session_that_leaves_while_its_move_is_planned_leaves_its_rows_clean(running):
    """Sessions open and close from another thread while the model thread steps and moves:
    every row ends free and reset, and a session afterwards equals one alone."""
    eng = running
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 2048, (10, 8))
    want, _ = _alone(eng, frames)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            hs = [eng.open(False, lambda o: None) for _ in range(3)]
            for h in hs:
                eng.push(h, frames[0])
            for h in hs[:2]:
                eng.close(h)
            time.sleep(0.003)
            eng.close(hs[2])

    t = threading.Thread(target=churn)
    t.start()
    time.sleep(1.5)
    stop.set()
    t.join()
    deadline = time.monotonic() + 30
    while eng.active and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(2):
        eng.submit(lambda: None).result(timeout=30)
    assert eng.active == 0 and eng.slots.held() == []
    got, _ = _alone(eng, frames)
    np.testing.assert_array_equal(got, want)


def test_warmup_steps_every_bucket_and_stats_report_rows():
    eng = _engine(4, codec=False)
    seen = []
    real = eng._step_tensors

    def spy(pcm, codes, ready, *a, **kw):
        seen.append(ready.shape[0])
        return real(pcm, codes, ready, *a, **kw)
    eng._step_tensors = spy
    eng.warmup(3)
    assert seen == [4, 4, 4, 2, 2, 1, 1]
    st = eng.stats()
    assert st["buckets"] == [1, 2, 4] and st["row_moves"] == 0
