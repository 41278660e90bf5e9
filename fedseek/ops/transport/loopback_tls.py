"""The site proxy's own TLS certificate for 127.0.0.1 (Flower's SuperNode refuses plain HTTP once it holds a node key).

A private CA that exists only in the site's state_dir signs a loopback-only server certificate;
the SuperNode trusts that CA (`--root-certificates`) and nothing else. Nothing here leaves the site.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_DAYS = 365


@dataclass(frozen=True)
class LoopbackTls:
    """Paths of the proxy's loopback CA and server certificate."""

    ca: Path
    cert: Path
    key: Path


def ensure_loopback_tls(directory: Path, *, min_days_left: int = 7) -> LoopbackTls:
    """Create (or renew when it expires within `min_days_left`) the loopback CA and server certificate."""
    from fedseek.ops import pki

    out = LoopbackTls(directory / "loopback-ca.crt", directory / "proxy.crt", directory / "proxy.key")
    if out.ca.is_file() and out.cert.is_file() and out.key.is_file():
        try:
            cert = pki.load_cert(out.cert)
            if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=min_days_left):
                return out
        except pki.PkiError:
            pass
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = pki.issue_ca("fedseek site proxy (loopback only)", days=LOOPBACK_DAYS)
    key, cert = pki.issue_server_cert(ca_key, ca_cert, hosts=[], ips=[], days=LOOPBACK_DAYS, common_name="127.0.0.1")
    pki.write_private_key(out.key, key)
    pki.write_cert(out.cert, cert)
    pki.write_cert(out.ca, ca_cert)
    return out
