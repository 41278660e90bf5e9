"""Who may call the coordinator endpoint: one registered, unrevoked site, named twice the same way.

The TLS handshake already proved the caller holds a key certified by the federation CA (gRPC
refuses anything else before a byte of HTTP/2). Per call the endpoint then checks, before
anything reaches the SuperLink, that the certificate is a site certificate (clientAuth) whose
name is in the coordinator's `sites`, whose serial is not in `revoked.json` (re-read when the file
changes, so `fedseek certs revoke` works without a restart), and that the Flower node key the
call carries (`flwr-public-key`) is the key registered for that same site.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("fedseek.ops.transport.access")
PUBLIC_KEY_HEADER = "flwr-public-key"  # Flower's SuperNode auth header: base64 of the node key's PEM SubjectPublicKeyInfo
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Denied(Exception):
    """A call refused before it reaches the SuperLink; the message is the logged reason."""


@dataclass(frozen=True)
class Caller:
    """The site a call comes from, as its certificate and node key both name it."""

    site: str
    serial: str


def load_sites(path: Path) -> dict[str, bytes]:
    """{site name: DER SubjectPublicKeyInfo of its Flower node key} from the endpoint's sites file."""
    return {str(e["name"]): base64.b64decode(e["node_key_spki"]) for e in json.loads(path.read_text())}


def write_sites(path: Path, sites: dict[str, bytes]) -> None:
    """Write {name: DER SubjectPublicKeyInfo} for the endpoint (public material only)."""
    from fedseek.files import atomic_write_json

    atomic_write_json(path, [{"name": n, "node_key_spki": base64.b64encode(k).decode()} for n, k in sorted(sites.items())],
                      mode=0o644)


class RevocationList:
    """Serials from `revoked.json` ({"serials": ["hex", ...]}), re-read whenever the file changes."""

    def __init__(self, path: Path | None):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[str] = frozenset()

    def serials(self) -> frozenset[str]:
        """The revoked serials now (a missing file: none; an unreadable one keeps the last good list, logged)."""
        if self.path is None:
            return self._serials
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._serials = None, frozenset()
            return self._serials
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text())
                self._serials = frozenset(str(s).lower() for s in data.get("serials", []))
                self._stamp = stamp
                log.info("revocation list %s: %d serial(s)", self.path, len(self._serials))
            except (OSError, ValueError, AttributeError) as exc:
                log.error("revocation list %s unreadable (%s): keeping the previous %d serial(s)", self.path, exc, len(self._serials))
        return self._serials


class SiteAccess:
    """The endpoint's per-call check (see the module docstring)."""

    def __init__(self, sites: dict[str, bytes], revoked: RevocationList):
        self.sites = sites
        self.revoked = revoked

    def check(self, cert_pem: bytes | None, public_key_b64: str | None) -> Caller:
        """The caller, or Denied with the reason."""
        if not cert_pem:
            raise Denied("no client certificate")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise Denied("unreadable client certificate") from None
        serial = format(cert.serial_number, "x")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise Denied(f"certificate {name!r} (serial {serial}) is not a site certificate (no clientAuth)")
        if name not in self.sites:
            raise Denied(f"certificate names {name!r}, which is not in the coordinator's sites")
        if serial in self.revoked.serials():
            raise Denied(f"certificate of {name!r} (serial {serial}) is revoked")
        if not public_key_b64:
            raise Denied(f"site {name!r}: the call carries no Flower node key")
        try:
            node_key = serialization.load_pem_public_key(base64.b64decode(public_key_b64, validate=True))
        except ValueError:
            raise Denied(f"site {name!r}: unreadable Flower node key") from None
        if node_key.public_bytes(*_SPKI) != self.sites[name]:
            raise Denied(f"certificate names {name!r} but the Flower node key is not {name!r}'s registered key")
        return Caller(name, serial)
