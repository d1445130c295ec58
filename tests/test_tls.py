"""TLS: `moshi-ttt serve --ssl-certfile/--ssl-keyfile` serves https and wss with a certificate
made in the test by `moshi-ttt tls-cert`'s code, and the Python client (`moshi-ttt chat`) talks
to it over wss:// when told to trust its CA (--ca-file) or not to check (--insecure), and says
what to do when it is not."""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.command import ChatCommand, run_command
from moshi_ttt.cli import app
from moshi_ttt.tls import make_self_signed
from server.loadtest import free_port

from conftest import CONFIGS, REPO
from fixtures import write_wav

TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tls") / "certs"
    make_self_signed(out, ["127.0.0.1"])
    return out


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tls-audio") / "in.wav"
    write_wav(path, np.random.default_rng(0).normal(0, 0.1, (1, 24000)).astype(np.float32), 24000)
    return path


def _https(url: str, cafile: Path) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def server(certs, tmp_path_factory):
    """`moshi-ttt serve` over TLS (random tiny weights), as a deployment starts it: the
    certificate named in the settings YAML, the key in the environment (the flags reach the
    same settings: the refusal tests below pass them)."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("tls-server")
    log = tmp / "serve.log"
    (tmp / "serve.yaml").write_text(f"ssl_certfile: {certs / 'cert.pem'}\n")
    cmd = [sys.executable, "-m", "moshi_ttt.cli", "serve", "--random-config", TINY, "--port",
           str(port), "--max-sessions", "2", "--device", "cpu", "--settings",
           str(tmp / "serve.yaml")]
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "PYTHONUNBUFFERED": "1",
           "MOSHI_TTT_SSL_KEYFILE": str(certs / "key.pem")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if _https(f"https://127.0.0.1:{port}/health", certs / "ca.pem")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, ssl.SSLError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        yield port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()


def test_serves_https_with_the_browser_client(server, certs):
    port, log = server
    status, page = _https(f"https://127.0.0.1:{port}/", certs / "ca.pem")
    assert status == 200 and b"static/style.css" in page
    assert _https(f"https://127.0.0.1:{port}/static/style.css", certs / "ca.pem")[0] == 200
    assert f"listening on https://127.0.0.1:{port} (chat: wss://127.0.0.1:{port}/api/chat)" \
        in log.read_text()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain http there
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)


def test_python_client_talks_over_wss_with_the_ca_file(server, certs, wav, tmp_path):
    port, _ = server
    out = tmp_path / "reply.wav"
    code = run_command(ChatCommand(url=f"wss://127.0.0.1:{port}", input=wav, output=out,
                                   mode="pcm", fast=True, tail=0.5,
                                   ca_file=certs / "ca.pem"))
    assert code == 0
    import sphn

    pcm, sr = sphn.read(str(out))
    assert sr == 24000 and pcm.shape[-1] >= 10 * 1920  # 1.5 s in: about 18 frames answered


def test_insecure_connects_without_checking(server, wav, caplog):
    port, _ = server
    with caplog.at_level(logging.WARNING):
        code = run_command(ChatCommand(url=f"https://127.0.0.1:{port}", input=wav, mode="pcm",
                                       fast=True, tail=0.0, insecure=True))
    assert code == 0
    assert "--insecure: the server's certificate is not checked" in caplog.text


def test_untrusted_certificate_is_refused_with_what_to_do(server, wav, caplog):
    port, _ = server
    with caplog.at_level(logging.ERROR):
        code = run_command(ChatCommand(url=f"wss://127.0.0.1:{port}", input=wav, mode="pcm"))
    assert code == 3
    assert "its TLS certificate is not trusted" in caplog.text
    assert "--ca-file" in caplog.text and "--insecure" in caplog.text


def test_ws_to_a_tls_server_says_use_wss(server, wav, caplog):
    port, _ = server
    with caplog.at_level(logging.ERROR):
        code = run_command(ChatCommand(url=f"ws://127.0.0.1:{port}", input=wav, mode="pcm"))
    assert code == 3
    assert "(if it serves TLS, use wss://)" in caplog.text


def test_wss_to_a_plain_server_says_it_is_not_tls(certs, wav, caplog):
    """A listener that answers in plain HTTP, as a server started without --ssl-certfile."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def answer() -> None:
        conn, _ = sock.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with caplog.at_level(logging.ERROR):
            code = run_command(ChatCommand(url=f"wss://127.0.0.1:{port}", input=wav, mode="pcm",
                                           ca_file=certs / "ca.pem", timeout=5))
    finally:
        sock.close()
    assert code == 3
    assert "TLS handshake failed" in caplog.text and "speaks ws://" in caplog.text


def test_serve_refuses_unusable_tls_files_before_anything_else(certs, tmp_path):
    """A key that is not the certificate's, or an encrypted key (OpenSSL would prompt for its
    passphrase): exit 2 and one line, before the checkpoint is even read."""
    from cryptography.hazmat.primitives import serialization

    other = make_self_signed(tmp_path / "other")
    key = serialization.load_pem_private_key((certs / "key.pem").read_bytes(), None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    for keyfile, phrase in ((other.keyfile, "KEY_VALUES_MISMATCH"),
                            (encrypted, "is encrypted: give an unencrypted PEM key")):
        r = CliRunner().invoke(app, ["serve", "--random-config", str(tmp_path / "absent.yaml"),
                                     "--ssl-certfile", str(certs / "cert.pem"),
                                     "--ssl-keyfile", str(keyfile)], catch_exceptions=False)
        assert r.exit_code == 2, r.output
        errors = [line for line in r.output.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and phrase in errors[0], r.output
        assert "absent.yaml" not in r.output  # refused before the config was looked at


def test_tls_files_from_the_environment_or_settings_are_checked_alike(certs, tmp_path,
                                                                       monkeypatch):
    """MOSHI_TTT_SSL_* and the settings YAML are refused as the flags are: one file alone, or
    a key that is not the certificate's, exit 2 with one line before the model is looked at."""
    other = make_self_signed(tmp_path / "other")
    monkeypatch.setenv("MOSHI_TTT_SSL_CERTFILE", str(certs / "cert.pem"))
    absent = str(tmp_path / "absent.yaml")
    r = CliRunner().invoke(app, ["serve", "--random-config", absent], catch_exceptions=False)
    assert r.exit_code == 2 and "was given without --ssl-keyfile (ssl_keyfile)" in r.output, \
        r.output
    settings = tmp_path / "serve.yaml"
    settings.write_text(f"ssl_keyfile: {other.keyfile}\n")
    r = CliRunner().invoke(app, ["serve", "--random-config", absent, "--settings",
                                 str(settings)], catch_exceptions=False)
    assert r.exit_code == 2 and "KEY_VALUES_MISMATCH" in r.output, r.output
    assert "absent.yaml" not in r.output


def test_unreadable_tls_files_are_one_clear_line(certs):
    """A certificate, key or CA file this user may not read: a TLSError / usage error naming
    the flag, the file and the reason (OpenSSL's bare PermissionError was a traceback from
    `serve` and from `chat`). Run as another user when root, whom permissions do not stop."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # the files, not their directory, are what may not be read
        for name in ("ca.pem", "cert.pem", "key.pem"):
            shutil.copy(certs / name, d / name)
            (d / name).chmod(0)
        code = ("import os\nfrom pathlib import Path\n"
                "from moshi_ttt.tls import TLSError, TLSFiles\n"
                "from client.chat import ChatUsageError, tls_context\n"
                "if os.geteuid() == 0:\n    os.setgid(65534)\n    os.setuid(65534)\n"
                f"d = Path({str(d)!r})\n"
                "for fn in (lambda: TLSFiles(d / 'cert.pem', d / 'key.pem').check(),\n"
                "           lambda: tls_context('wss://h', d / 'ca.pem')):\n"
                "    try:\n        fn()\n    except (TLSError, ChatUsageError) as e:\n"
                "        print(type(e).__name__, e)\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines == [
        f"TLSError --ssl-certfile {d / 'cert.pem'}: cannot read it (Permission denied); the "
        f"server's user needs read access",
        f"ChatUsageError --ca-file {d / 'ca.pem'}: cannot read it (Permission denied)"], lines


def test_swapped_or_non_pem_tls_files_say_which_one(certs, tmp_path):
    """OpenSSL says only "PEM lib" when it cannot parse either file: the message names the
    one that holds no certificate or no key."""
    from moshi_ttt.tls import TLSError, TLSFiles

    with pytest.raises(TLSError) as e:  # the two swapped
        TLSFiles(certs / "key.pem", certs / "cert.pem").check()
    assert str(e.value).startswith(f"--ssl-certfile {certs / 'key.pem'} holds no PEM "
                                   f"certificate"), e.value
    with pytest.raises(TLSError) as e:  # the CA's certificate given as the key
        TLSFiles(certs / "cert.pem", certs / "ca.pem").check()
    assert str(e.value).startswith(f"--ssl-keyfile {certs / 'ca.pem'} holds no PEM private "
                                   f"key"), e.value
    TLSFiles(certs / "cert.pem", certs / "key.pem").check()  # the pair itself is fine


def test_a_certificate_for_other_names_says_so_not_pass_ca_file(tmp_path, wav, caplog,
                                                                 monkeypatch):
    """The right --ca-file, but a certificate made for other host names: the error says the
    certificate does not name the host (and how to make one that does); it used to say to
    pass --ca-file, which was given."""
    from websockets.sync.server import serve

    from moshi_ttt import tls
    from moshi_ttt.protocol import HANDSHAKE

    monkeypatch.setattr(tls, "LOCAL_HOSTS", ())  # a certificate for elsewhere.test alone
    files = tls.make_self_signed(tmp_path / "other-name", ["elsewhere.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.certfile, files.keyfile)

    def handler(ws):
        ws.send(HANDSHAKE)
        for _ in ws:
            pass

    with serve(handler, "127.0.0.1", 0, ssl=ctx) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        with caplog.at_level(logging.ERROR):
            code = run_command(ChatCommand(url=f"wss://127.0.0.1:{port}", input=wav,
                                           mode="pcm", ca_file=tmp_path / "other-name" / "ca.pem",
                                           timeout=10))
        server.shutdown()
    assert code == 3
    assert "its TLS certificate does not name '127.0.0.1'" in caplog.text, caplog.text
    assert "moshi-ttt tls-cert DIR --host 127.0.0.1" in caplog.text, caplog.text
    assert "pass --ca-file" not in caplog.text, caplog.text
