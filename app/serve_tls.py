"""``moshi-mlx serve``'s https for other devices: the TLS context of ``--ssl-cert`` and
``--ssl-key``, or of a self-signed certificate made once and kept in the user's cache folder."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from moshi_mlx.errors import MoshiError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback_bind(host: str) -> bool:
    return host in LOOPBACK_HOSTS


# -- https for other devices --------------------------------------------------------------------


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or (
        Path.home() / ("Library/Caches" if sys.platform == "darwin" else ".cache")
    )
    return Path(base) / "moshi-mlx" / "serve"


def self_signed_certificate() -> tuple[Path, Path]:
    """A self-signed certificate for this machine, made once (with the ``openssl`` command,
    on every Mac and Linux; EC P-256, ten years) and kept in the user's cache folder."""
    folder = cache_folder()
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.is_file() and key.is_file():
        return cert, key
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = socket.gethostname() or "localhost"
    tmp_cert, tmp_key = folder / f".cert.{os.getpid()}.pem", folder / f".key.{os.getpid()}.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
               "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650",
               "-subj", f"/CN={name}", "-keyout", str(tmp_key), "-out", str(tmp_cert)]  # fmt: skip
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise MoshiError(
            "a non-loopback --host serves https and making its certificate needs the openssl "
            "command; install it, or give --ssl-cert and --ssl-key"
        ) from None
    if r.returncode != 0:
        for p in (tmp_cert, tmp_key):
            p.unlink(missing_ok=True)
        raise MoshiError(f"openssl could not make a certificate: {' '.join(r.stderr.split())}")
    os.chmod(tmp_key, 0o600)
    os.replace(tmp_key, key)
    os.replace(tmp_cert, cert)
    return cert, key


def fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def tls_context(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, Path | None]:
    if (args.ssl_cert is None) != (args.ssl_key is None):
        raise MoshiError("--ssl-cert and --ssl-key go together")
    if args.ssl_cert is None and is_loopback_bind(args.host):
        return None, None
    cert, key = (
        (Path(args.ssl_cert), Path(args.ssl_key)) if args.ssl_cert else self_signed_certificate()
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise MoshiError(f"cannot use the certificate {cert} with key {key}: {e}") from None
    return context, cert
