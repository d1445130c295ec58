"""`moshi-ttt demo`, the README's first command: every stage runs for real on a small budget,
and a second run reuses what the first built."""

import json

from typer.testing import CliRunner

from moshi_ttt.cli import app
from moshi_ttt.resources import packaged_config


def test_demo_end_to_end_then_reused(tmp_path, monkeypatch):
    import moshi_ttt.cli as cli

    monkeypatch.setattr(cli, "setup_logging", lambda verbose=False: None)
    from moshi_ttt.demo import run_demo

    work = tmp_path / "demo"
    res = run_demo(work, steps=2, mode="pcm", dialogues=4)
    assert (work / "out.wav").stat().st_size > 44 and (work / "out.txt").is_file()
    assert res["health"]["status"] == "ok"
    assert res["health"]["checkpoint"]["step"] == 2 and res["health"]["model"]["ttt"]["layers"]
    ckpt = json.loads((work / "run" / "checkpoints" / "step_000002" / "config.json").read_text())
    assert ckpt["step"] == 2

    mtimes = {p: p.stat().st_mtime_ns for p in (work / "data").rglob("*.wav")}
    weights = work / "base" / "model.safetensors"
    mtimes[weights] = weights.stat().st_mtime_ns
    out = CliRunner().invoke(app, ["demo", "--workdir", str(work), "--steps", "2", "--mode",
                                   "pcm", "--dialogues", "4"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "output audio :" in out.output and '"status": "ok"' in out.output
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # nothing rebuilt
    assert sorted(p.name for p in (work / "run" / "checkpoints").iterdir()) == \
        ["latest", "step_000002"]  # no further training

    # another config: the run is made again for it (the base, whose sections did not change,
    # is kept); before, the first config's run was served and the demo said all was well
    variant = tmp_path / "variant.yaml"
    variant.write_text(packaged_config("tiny.yaml").read_text().replace(
        "gate_init: 2.0", "gate_init: 0.2"))
    out = CliRunner().invoke(app, ["demo", "--workdir", str(work), "--steps", "2", "--mode",
                                   "pcm", "--dialogues", "4", "--config", str(variant)],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert weights.stat().st_mtime_ns == mtimes[weights]
    ckpt = json.loads((work / "run" / "checkpoints" / "step_000002" / "config.json").read_text())
    assert ckpt["project"]["ttt"]["gate_init"] == 0.2


def test_a_demo_stopped_while_removing_a_stale_run_finds_it_stale_again(tmp_path, monkeypatch):
    """The record of what the base and run were made for is written only once the stale ones
    are gone: stopped in between (Ctrl-C), the next demo removes them again instead of serving
    the old config's run (before, the record came first)."""
    import moshi_ttt.demo as demo
    from moshi_ttt.config import load_config

    tiny = load_config(packaged_config("tiny.yaml"))
    other = tiny.model_copy(update={"ttt": tiny.ttt.model_copy(update={"gate_init": 0.2})})
    work = tmp_path / "demo"
    paths = {"base": work / "base", "run": work / "run"}
    for p in paths.values():
        p.mkdir(parents=True)
    demo.remove_stale_parts(work, tiny, 4, paths)  # the first demo's record
    assert all(p.is_dir() for p in paths.values())

    def interrupted(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo.shutil, "rmtree", interrupted)
    try:
        demo.remove_stale_parts(work, other, 4, paths)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert demo._stale_parts(work, other, 4)[0] == ["run"]  # still stale for the new config
    demo.remove_stale_parts(work, other, 4, paths)
    assert paths["base"].is_dir() and not paths["run"].exists()
    assert demo._stale_parts(work, other, 4)[0] == []
