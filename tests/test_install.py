"""A non-editable install works outside the checkout: the wheel carries the project configs and
the whole browser client, and the commands find them through the installed packages
(`moshi_ttt.resources`), not through the source tree.

The slow tests build the wheel from a copy of the sources, install it (no dependencies) into a
fresh virtual environment that borrows the test environment's third-party packages through a
.pth line (torch and moshi are not reinstalled), and run `moshi-ttt serve --random-config
configs/tiny.yaml` and `moshi-ttt demo` from a directory that has no configs/."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from moshi_ttt.resources import packaged_config, packaged_configs, resolve_config, web_dir
from server.loadtest import free_port

from conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "moshi_ttt", "server", "client")


def _source_files(rel: str) -> set[str]:
    root = REPO / rel
    return {p.relative_to(REPO).as_posix() for p in root.rglob("*") if p.is_file()
            and "__pycache__" not in p.parts}


# -- fast: the lookups ----------------------------------------------------------------------------

def test_configs_resolve_inside_the_package(tmp_path, monkeypatch):
    assert {"tiny.yaml", "moshi-7b.yaml"} <= set(packaged_configs())
    tiny = packaged_config("tiny.yaml")
    assert tiny.parent.parent.name == "moshi_ttt" and tiny.is_file()
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config(Path("configs/tiny.yaml")) == tiny
    for untouched in ("configs/nope.yaml", "elsewhere/tiny.yaml", "tiny.yaml"):
        assert resolve_config(Path(untouched)) == Path(untouched)
    own = tmp_path / "configs" / "tiny.yaml"  # a file of that name here wins
    own.parent.mkdir()
    own.write_text("lm: {}\n")
    assert resolve_config(Path("configs/tiny.yaml")) == Path("configs/tiny.yaml")


def test_the_checkout_configs_path_is_the_packaged_one():
    assert (REPO / "configs").resolve() == packaged_config("tiny.yaml").parent.resolve()


def test_web_dir_holds_the_whole_browser_client():
    names = {p.name for p in web_dir().iterdir()}
    assert {"index.html", "app.js", "style.css"} <= names
    assert names == {Path(f).name for f in _source_files("client/web")}


# -- slow: a wheel in a fresh environment ---------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=ignore)
        else:
            shutil.copy2(item, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(root / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (root / "dist").glob("moshi_ttt-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no deps) and this environment's third-party
    packages on its path (after its own site-packages, without running their .pth hooks, so
    the checkout's editable install stays out)."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    py = root / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site.stdout.strip()) / "_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return root


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "NO_TORCH_COMPILE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_wheel_carries_configs_and_the_whole_browser_client(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("moshi_ttt/configs", "client/web"):
        missing = _source_files(rel) - names
        assert not missing, f"{wheel.name} lacks {sorted(missing)}"


@pytest.mark.slow
def test_installed_packages_come_from_the_wheel(venv, tmp_path):
    code = ("import client, moshi_ttt, server; from moshi_ttt.resources import config_dir, "
            "web_dir; print(moshi_ttt.__file__, client.__file__, server.__file__, config_dir(), "
            "web_dir())")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for path in r.stdout.split():
        assert Path(path).is_relative_to(venv), r.stdout


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


@pytest.mark.slow
def test_installed_serve_finds_the_packaged_config_and_browser_client(venv, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "moshi-ttt"), "serve", "--random-config", "configs/tiny.yaml",
             "--port", str(port), "--max-sessions", "1", "--device", "cpu"],
            cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        status, kind, page = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and kind.startswith("text/html") and b"static/style.css" in page
        status, kind, css = _get(f"http://127.0.0.1:{port}/static/style.css")
        assert status == 200 and kind.startswith("text/css"), (status, kind)
        assert css == (REPO / "client" / "web" / "style.css").read_bytes()
        assert _get(f"http://127.0.0.1:{port}/static/app.js")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()
    text = log.read_text()
    assert f"using the packaged {venv}" in text, text  # configs/tiny.yaml: the wheel's


@pytest.mark.slow
def test_installed_demo_runs_from_the_packaged_config(venv, tmp_path):
    """The demo, outside any checkout, on a small budget. Its base is made first by the
    installed `init-base` with a minimal codec calibration (the demo's own calibration takes
    minutes on 2 cores); the demo reuses it and runs every other step itself."""
    cli = str(venv / "bin" / "moshi-ttt")
    work = tmp_path / "demo"

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run([cli, *args], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"moshi-ttt {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r

    packaged = next(venv.glob("lib/python*/site-packages/moshi_ttt/configs/tiny.yaml"))
    run("make-data", str(work / "data"), "--dialogues", "3")
    cheap = yaml.safe_load(packaged.read_text())
    cheap["codec_calibration"] = {"joint_steps": 0, "decoder_steps": 0, "init_seconds": 2.0,
                                  "kmeans_frames": 64, "max_seconds": 20.0}
    (tmp_path / "cheap.yaml").write_text(yaml.safe_dump(cheap))
    run("init-base", str(work / "base"), "-c", "cheap.yaml", "--calibrate-on",
        str(work / "data"))
    r = run("demo", "--workdir", str(work), "--steps", "2", "--dialogues", "3", "--mode", "pcm")
    log = r.stdout + r.stderr
    assert f"config {packaged}" in log, log
    assert f"reusing {work / 'base'}" in log, log
    assert "output audio :" in r.stdout and '"status": "ok"' in r.stdout, log
    assert (work / "out.wav").stat().st_size > 44
    assert (work / "run" / "checkpoints" / "step_000002").is_dir()
