"""When a step runs (issue 15, item 2): the "window" clock steps batch_wait_s after the first
frame is ready; the "tick" clock steps a frame period after the last step took its frames, or
as soon as every active session has a frame, so that sessions of independent phases share one
step per period instead of splitting into steps of whoever came. Neither changes an output."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERIOD = 0.08


def _engine(clock: str, capacity: int = 2, **kw):
    from moshi_ttt.checkpoint import random_model
    from server.engine import Engine, EngineConfig

    m = random_model(CONFIGS / "tiny.yaml", with_codec=False)
    kw.setdefault("batch_wait_s", 0.02)
    return Engine(m.lm, None, EngineConfig(capacity=capacity, use_sampling=False,
                                           batch_clock=clock, telemetry_every=0, **kw))


def _codes(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (n, 8))


def _two_sessions(eng):
    """Two open sessions on a stopped engine, their row resets taken: `_take` is driven by hand."""
    a = eng.open(False, lambda o: None)
    b = eng.open(False, lambda o: None)
    with eng._cond:
        resets, _, _, batch = eng._take()
    assert sorted(resets) == [0, 1] and batch == []
    return a, b


def _timed_take(eng) -> tuple[float, list]:
    t0 = time.monotonic()
    with eng._cond:
        _, _, _, batch = eng._take()
    return time.monotonic() - t0, [h.slot for h, _ in batch]


@pytest.mark.parametrize("clock", ["window", "tick"])
def test_a_step_waits_for_an_active_session_by_its_clock(clock):
    """A frame of A is ready, B (sent 10 ms ago) is not: the window steps A after batch_wait_s,
    the tick a period after the last step took its frames."""
    eng = _engine(clock)
    a, b = _two_sessions(eng)
    b.last_push = time.monotonic() - 0.01  # B is active: it sent a frame 10 ms ago
    eng._last_take = time.monotonic()  # the last step took its frames just now
    eng.push(a, _codes(0, 1)[0])
    dt, slots = _timed_take(eng)
    assert slots == [a.slot]
    if clock == "window":
        assert 0.015 <= dt < 0.075, dt
    else:
        assert dt >= PERIOD - 0.005, dt


def test_tick_steps_as_soon_as_every_session_is_in():
    """B's frame comes 30 ms after A's: one step takes both, without waiting for the period."""
    eng = _engine("tick")
    a, b = _two_sessions(eng)
    b.last_push = eng._last_take = time.monotonic()
    eng.push(a, _codes(0, 1)[0])
    late = threading.Timer(0.03, eng.push, (b, _codes(1, 1)[0]))
    late.start()
    dt, slots = _timed_take(eng)
    late.join()
    assert sorted(slots) == [a.slot, b.slot]
    assert 0.025 <= dt < PERIOD - 0.005, dt


def test_tick_steps_at_once_after_idle_and_for_a_session_behind():
    """The first frame after a quiet period steps at once; so does a session with more than one
    frame queued (waiting for the period would keep it behind for good)."""
    eng = _engine("tick")
    a, b = _two_sessions(eng)
    b.last_push = time.monotonic()
    eng._last_take = time.monotonic() - 2 * PERIOD  # nothing stepped for two periods
    eng.push(a, _codes(0, 1)[0])
    dt, slots = _timed_take(eng)
    assert slots == [a.slot] and dt < 0.04, dt
    b.last_push = time.monotonic()
    for frame in _codes(0, 2):  # A is behind: two frames queued, B active but not in
        eng.push(a, frame)
    dt, slots = _timed_take(eng)
    assert slots == [a.slot] and dt < 0.04, dt
    assert len(a.inbox) == 1


def test_an_unknown_clock_is_refused():
    with pytest.raises(ValueError, match=r"batch_clock must be one of \('window', 'tick'\), "
                                         r"got 'lockstep'"):
        _engine("lockstep")


class _LatenessProbe:
    """How late this process's threads wake up while the run goes on: a thread that asks for
    1 ms sleeps and keeps the worst overshoot. On a machine running other heavy work beside
    the tests, the engine's thread can wake tens of ms late and then rightly find both
    sessions' frames in: the clock did what it should, but the batching it was asked to show
    is not measurable on that run."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            time.sleep(0.001)
            self.worst = max(self.worst, time.monotonic() - t0 - 0.001)

    def __enter__(self) -> "_LatenessProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _phased_run(eng, inputs: dict[str, np.ndarray], phase: dict[str, float]
                ) -> tuple[dict[str, np.ndarray], float]:
    """Each session pushes a frame every 80 ms from its own thread, at its own phase; returns
    each session's text + audio tokens and the mean sessions per step."""
    outs: dict[str, list] = {k: [] for k in inputs}
    handles = {k: eng.open(False, outs[k].append) for k in inputs}
    for h in handles.values():
        h.ready.result(timeout=30)
    steps0 = eng.steps
    t0 = time.monotonic() + 0.05

    def send(name: str) -> None:
        for i, frame in enumerate(inputs[name]):
            time.sleep(max(0.0, t0 + phase[name] + i * PERIOD - time.monotonic()))
            eng.push(handles[name], frame)

    threads = [threading.Thread(target=send, args=(k,)) for k in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 60
    while any(len(outs[k]) < len(inputs[k]) for k in inputs):
        assert time.monotonic() < deadline, "no answer within 60 s"
        time.sleep(0.005)
    per_step = [b for _, b, _ in list(eng.recent)[-(eng.steps - steps0):]]
    for h in handles.values():
        eng.close(h)
    toks = {k: np.array([np.concatenate([[o.text_token], o.codes]) for o in outs[k]])
            for k in inputs}
    return toks, float(np.mean(per_step))


#: The two sessions' phase difference: half the 80 ms period, so that the window clock's
#: 20 ms window closes 20 ms before the other session's frame and 40 ms after it.
PHASE_S = 0.04
#: Wake-up lateness (the probe's worst) beyond which a run cannot show the window clock's
#: batching: the 20 ms margin above (a thread that wakes that late can find both frames in).
STARVED_S = 0.02


@pytest.mark.parametrize("clock", ["window", "tick"])
def test_sessions_of_different_phases_equal_each_alone(clock):
    """Two sessions 40 ms apart in phase, in real time: the tick clock steps them together
    (about 2 sessions a step), the window clock one by one (the other is not in within
    batch_wait_s); under both every token equals that of the session streamed alone.

    The window clock's one-by-one needs threads that wake on time: a run that stepped them
    together while this process woke more than STARVED_S late (other heavy work on the
    machine) is tried again, up to 3 runs; the tokens are checked on every run."""
    eng = _engine(clock)
    eng.warmup(1)
    eng.start()
    inputs = {"A": _codes(1, 14), "B": _codes(2, 14)}
    tries: list[tuple[float, float]] = []
    try:
        alone = {k: _phased_run(eng, {k: v}, {k: 0.0})[0][k] for k, v in inputs.items()}
        for _ in range(3):
            with _LatenessProbe() as probe:
                both, per_step = _phased_run(eng, inputs, {"A": 0.0, "B": PHASE_S})
            for k in inputs:
                np.testing.assert_array_equal(both[k], alone[k], err_msg=k)
            tries.append((per_step, probe.worst))
            # lateness can only merge steps: a starved run that stepped one by one still counts
            if clock == "tick" or per_step <= 1.4 or probe.worst <= STARVED_S:
                break
    finally:
        eng.stop()
    per_step, worst = tries[-1]
    if clock == "tick":
        assert per_step >= 1.6, per_step
    elif per_step <= 1.4 or worst <= STARVED_S:
        assert per_step <= 1.4, tries
    else:
        pytest.skip(f"window clock's batching not measurable: this process woke at least "
                    f"{1000 * min(w for _, w in tries):.0f} ms late in each of {len(tries)} "
                    f"runs (sessions per step, lateness: {tries}); the tokens were checked")


def test_the_server_setting_reaches_the_engine_and_health():
    """`batch_clock` (flag, MOSHI_TTT_BATCH_CLOCK or YAML) is the engine's, and /health says
    which clock ran the figures it reports; anything else is refused when settings are read."""
    from pydantic import ValidationError

    from serving import ServerThread, get_json, random_settings

    with pytest.raises(ValidationError, match="batch_clock"):
        random_settings(batch_clock="lockstep")
    with ServerThread(random_settings(batch_clock="tick")) as srv:
        assert srv.host.engine.cfg.batch_clock == "tick"
        status, health = get_json(f"http://127.0.0.1:{srv.port}/health")
    assert status == 200 and health["engine"]["batch_clock"] == "tick"
