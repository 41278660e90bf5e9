"""Site bundles: a site's OpenSSH key pair for Flower's SuperNode authentication, with the CA copy and config it needs."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedseek.ops.pki.checks import cert_sha256, utc_now, verify_chain
from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.files import load_cert, public_mode, refuse_existing, write_file
from fedseek.ops.pki.layout import BUNDLE_JSON, CA_CRT, COORDINATOR_CRT, SITE_YAML, SITES_DIR, SiteBundle

_SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def validate_site_name(name: str) -> str:
    """Return `name` if usable as a site/file name (letters, digits, '-', '_'), else raise PkiError."""
    if not isinstance(name, str) or not _SITE_NAME_RE.match(name):
        raise PkiError(
            f"invalid site name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def parse_address(address: str) -> tuple[str, int]:
    """Split Flower's `--superlink` form host:port (no scheme); IPv6 as [addr]:port."""
    if "://" in address:
        raise PkiError(f"coordinator address {address!r} must be host:port without a scheme (Flower's --superlink form)")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s/\[\]]+):(\d+)", address.strip())
    if not m:
        raise PkiError(f"coordinator address {address!r} must be host:port, e.g. coord.example.org:9092")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 1 <= int(port) <= 65535:
        raise PkiError(f"coordinator address {address!r}: port must be 1-65535")
    return host, int(port)


def _site_ca(certs_dir: Path, name: str, coordinator_address: str, host: str) -> x509.Certificate:
    """The CA a site will trust, after checking the coordinator certificate (if any) is valid for the site's address."""
    ca_path = certs_dir / CA_CRT
    if not ca_path.exists():
        raise PkiError(f"no CA at {ca_path}: run `fedseek certs init` first")
    ca_cert = load_cert(ca_path)
    coord_path = certs_dir / COORDINATOR_CRT
    if coord_path.exists():  # a mismatch would only surface as a TLS error at the site
        try:
            verify_chain(ca_cert, coord_path, hostname=host)
        except PkiError as err:
            raise PkiError(f"site {name} could not connect to {coordinator_address}: {err}") from None
    return ca_cert


def _facts(bundle: SiteBundle, ca_cert: x509.Certificate) -> dict[str, Any]:
    """bundle.json: what the site and the operator check, with fingerprints; paths relative to the bundle."""
    return {
        "site": bundle.name,
        "coordinator_address": bundle.coordinator_address,
        "root_certificates": CA_CRT,
        "auth_private_key": bundle.name,
        "auth_public_key": f"{bundle.name}.pub",
        "public_key_fingerprint": bundle.fingerprint,
        "ca_fingerprint": cert_sha256(ca_cert),
        "ca_not_after": ca_cert.not_valid_after_utc.isoformat(),
        "created": utc_now().replace(microsecond=0).isoformat(),
    }


def _site_yaml(bundle: SiteBundle, ca_fingerprint: str) -> str:
    """site.yaml: the snippet for the site's config, with how the operator registers the key."""
    name, fingerprint = bundle.name, bundle.fingerprint
    return (
        f"# fedseek site bundle for {name!r}: copy this directory to the site; paths are relative to it.\n"
        f"# Coordinator operator registers the key: flwr supernode register {name}.pub <connection> --name {name}\n"
        f"# Public key fingerprint (compare out of band): {fingerprint}\n"
        f"# CA fingerprint: {ca_fingerprint}\n"
        "site:\n"
        f"  name: {json.dumps(name)}\n"
        f"  coordinator: {json.dumps(bundle.coordinator_address)}\n"
        f"  root_certificates: {json.dumps(CA_CRT)}\n"
        f"  auth_private_key: {json.dumps(name)}\n"
        f"  tls_certificate: {json.dumps(name + '.crt')}\n"
        f"  tls_private_key: {json.dumps(name + '.tls.key')}\n"
    )


def add_site(
    certs_dir: Path,
    name: str,
    coordinator_address: str,
    force: bool = False,
) -> SiteBundle:
    """Create a site's keys, certificate and bundle (CA copy, site.yaml, bundle.json) under sites/NAME/ in one step.

    A shortcut for one machine (demos, tests): the site's private keys are made on the coordinator's
    host. Between organisations use `request_site` at the site and `sign_request` here instead.
    """
    from fedseek.ops.pki.requests import request_site, sign_request

    certs_dir = Path(certs_dir)
    validate_site_name(name)
    host, _port = parse_address(coordinator_address)
    ca_cert = _site_ca(certs_dir, name, coordinator_address, host)
    bundle = SiteBundle.under(certs_dir, name, coordinator_address)
    reserved = {CA_CRT, SITE_YAML, BUNDLE_JSON}
    if name in reserved or f"{name}.pub" in reserved:
        raise PkiError(f"invalid site name {name!r}: clashes with a bundle file name")
    refuse_existing(bundle.files, force)

    (certs_dir / SITES_DIR).mkdir(exist_ok=True, mode=0o700)
    req = request_site(bundle.dir, name, force=True)
    sign_request(certs_dir, req.csr, req.node_pub, force=True)
    bundle = replace(bundle, fingerprint=req.fingerprint)
    facts = _facts(bundle, ca_cert)
    public = public_mode()
    write_file(bundle.ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), public, overwrite=True)
    write_file(bundle.site_yaml, _site_yaml(bundle, facts["ca_fingerprint"]).encode(), public, overwrite=force)
    write_file(bundle.bundle_json, (json.dumps(facts, indent=2) + "\n").encode(), public, overwrite=force)
    return bundle
