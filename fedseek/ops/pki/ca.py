"""The coordinator's side on disk: create the CA with the coordinator certificate, or re-issue that certificate alone."""

from __future__ import annotations

from pathlib import Path

from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.files import load_cert, load_private_key, refuse_existing, write_cert, write_private_key
from fedseek.ops.pki.issue import DEFAULT_CA_DAYS, issue_ca, issue_server_cert
from fedseek.ops.pki.keys import same_public_key
from fedseek.ops.pki.layout import CA_CRT, CA_KEY, CertPaths


def init_ca(
    out_dir: Path,
    hosts: list[str],
    ips: list[str],
    days: int = 365,
    force: bool = False,
    key_type: str = "ec",
    *,
    ca_days: int = DEFAULT_CA_DAYS,
) -> CertPaths:
    """Create the CA and the coordinator certificate (SANs always include localhost and 127.0.0.1, which Flower's SuperExec needs)."""
    out_dir = Path(out_dir)
    paths = CertPaths.under(out_dir)
    refuse_existing([paths.ca_crt, paths.ca_key, paths.coordinator_crt, paths.coordinator_key], force)
    ca_key, ca_cert = issue_ca(days=max(ca_days, days), key_type=key_type)
    srv_key, srv_cert = issue_server_cert(ca_key, ca_cert, hosts, ips, days=days, key_type=key_type)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_key(paths.ca_key, ca_key, overwrite=force)
    write_cert(paths.ca_crt, ca_cert, overwrite=force)
    write_private_key(paths.coordinator_key, srv_key, overwrite=force)
    write_cert(paths.coordinator_crt, srv_cert, overwrite=force)
    return paths


def issue_coordinator_cert(
    certs_dir: Path,
    hosts: list[str],
    ips: list[str],
    days: int = 365,
    force: bool = False,
    key_type: str = "ec",
) -> CertPaths:
    """Re-issue only the coordinator certificate from the existing CA, so site bundles stay valid (renewal, new host name)."""
    certs_dir = Path(certs_dir)
    paths = CertPaths.under(certs_dir)
    if not paths.ca_crt.exists() or not paths.ca_key.exists():
        raise PkiError(f"no CA in {certs_dir} (need {CA_CRT} and {CA_KEY}): run `fedseek certs init` first")
    refuse_existing([paths.coordinator_crt, paths.coordinator_key], force)
    ca_cert, ca_key = load_cert(paths.ca_crt), load_private_key(paths.ca_key)
    if not same_public_key(ca_cert.public_key(), ca_key.public_key()):
        raise PkiError(f"{paths.ca_key} does not belong to {paths.ca_crt}")
    srv_key, srv_cert = issue_server_cert(ca_key, ca_cert, hosts, ips, days=days, key_type=key_type)
    write_private_key(paths.coordinator_key, srv_key, overwrite=force)
    write_cert(paths.coordinator_crt, srv_cert, overwrite=force)
    return paths
