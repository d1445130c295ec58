"""TLS for `moshi-ttt serve`: a browser on another machine gets the microphone only on a secure
(https) page, so the browser client needs the server to speak https and wss.

`TLSFiles` is what `serve --ssl-certfile/--ssl-keyfile` hands to uvicorn (its own TLS), checked
before the port is bound. `make_self_signed` is the quick path when there is no certificate
from a real CA: a one-off local CA and a server certificate it signs for the given host names
and addresses (`moshi-ttt tls-cert DIR`). The CA's private key is never written, so that CA can
sign nothing else; clients trust the server by trusting `ca.pem` (`moshi-ttt chat --ca-file`,
or the browser's certificate settings), or click through the browser's warning.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

CA_NAME, CERT_NAME, KEY_NAME = "ca.pem", "cert.pem", "key.pem"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class TLSError(ValueError):
    """TLS files that cannot be used (missing, not PEM, key and certificate not a pair)."""


@dataclass(frozen=True)
class TLSFiles:
    """A PEM certificate (chain) and its PEM private key (unencrypted)."""

    certfile: Path
    keyfile: Path

    def check(self) -> None:
        """Load the pair as uvicorn will, so that a wrong path, a key that is not the
        certificate's, or an encrypted key (OpenSSL would prompt for its passphrase) fails
        now, in one line, before the port is bound."""
        contents: dict[str, bytes] = {}
        for flag, path in (("--ssl-certfile", self.certfile), ("--ssl-keyfile", self.keyfile)):
            if not path.is_file():
                raise TLSError(f"{flag} {path}: no such file")
            try:  # OpenSSL would raise a bare OSError (a traceback) for an unreadable file
                contents[flag] = path.read_bytes()
            except OSError as e:
                raise TLSError(f"{flag} {path}: cannot read it ({e.strerror or e}); the "
                               f"server's user needs read access") from None

        def no_passphrase() -> str:
            raise TLSError(f"--ssl-keyfile {self.keyfile} is encrypted: give an unencrypted "
                           f"PEM key (the server cannot ask for a passphrase)")

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile, password=no_passphrase)
        except ssl.SSLError as e:
            raise TLSError(_not_pem(contents["--ssl-certfile"], contents["--ssl-keyfile"],
                                    self.certfile, self.keyfile)
                           or f"cannot use certificate {self.certfile} with key {self.keyfile}: "
                           f"{e.reason or e} (expected a PEM certificate and the PEM private "
                           f"key it was made for)") from None
        except OSError as e:  # read a moment ago; gone or changed since
            raise TLSError(f"cannot read certificate {self.certfile} or key {self.keyfile}: "
                           f"{e.strerror or e}") from None

    def uvicorn_options(self) -> dict[str, str]:
        return {"ssl_certfile": str(self.certfile), "ssl_keyfile": str(self.keyfile)}


_PEM_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9 ]+ )?PRIVATE KEY-----")


def _not_pem(cert: bytes, key: bytes, certfile: Path, keyfile: Path) -> str | None:
    """Which file OpenSSL could not parse, where it is plain (OpenSSL says only "PEM lib"):
    a certificate file without a certificate (e.g. the key given twice, or DER), a key file
    without a key (e.g. the two swapped). None when both look right."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        return (f"--ssl-certfile {certfile} holds no PEM certificate (expected a "
                f"'-----BEGIN CERTIFICATE-----' block, e.g. the cert.pem of `moshi-ttt tls-cert`)")
    if not _PEM_KEY.search(key):
        return (f"--ssl-keyfile {keyfile} holds no PEM private key (expected a "
                f"'-----BEGIN PRIVATE KEY-----' block, e.g. the key.pem of `moshi-ttt tls-cert`)")
    return None


def _general_name(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host.isascii() or not all(
            label and len(label) <= 63 and all(c.isalnum() or c == "-" for c in label)
            for label in labels):
        raise TLSError(f"--host {host!r}: not a host name or an IP address")
    return x509.DNSName(host.lower())


def make_self_signed(out_dir: Path, hosts: list[str] | tuple[str, ...] = (), days: int = 365,
                     overwrite: bool = False) -> TLSFiles:
    """Write `ca.pem` (a one-off CA's certificate), `cert.pem` (a server certificate for
    `hosts` plus localhost, 127.0.0.1 and ::1, followed by the CA's) and `key.pem` (its key,
    readable by the owner only) into `out_dir`. ECDSA P-256, SHA-256, valid `days` days
    (at most 398: what browsers accept)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not 1 <= days <= 398:
        raise TLSError(f"--days must be between 1 and 398 (browsers refuse longer), got {days}")
    names = list(dict.fromkeys([*hosts, *LOCAL_HOSTS]))
    alt_names = [_general_name(h) for h in names]
    out_dir = Path(out_dir)
    paths = [out_dir / n for n in (CA_NAME, CERT_NAME, KEY_NAME)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise TLSError(f"{', '.join(existing)} already exist(s): a server may be using them; "
                       f"pass --force to replace them")

    now = datetime.now(timezone.utc)
    start, end = now - timedelta(minutes=5), now + timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moshi-ttt"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"moshi-ttt local CA {now:%Y-%m-%d %H:%M:%S}"),
    ])
    ca = (x509.CertificateBuilder()
          .subject_name(ca_subject).issuer_name(ca_subject).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    out_dir.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = paths
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_bytes = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.chmod(key_path, 0o600)  # also when the file existed with a wider mode
    return TLSFiles(cert_path, key_path)
