"""Facts read off a certificate and the checks built on them: CA flag, SANs, signature by the CA, validity, host name."""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.files import load_cert

CertLike = Path | str | x509.Certificate


def utc_now() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """`value` with UTC attached when it is naive."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def as_cert(value: CertLike) -> x509.Certificate:
    """A certificate object from itself or from a file path."""
    return value if isinstance(value, x509.Certificate) else load_cert(value)


def cert_sha256(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint as "SHA256:AA:BB:..."."""
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def sans(cert: x509.Certificate) -> tuple[str, ...]:
    """The subject alternative names as "DNS:name" and "IP:addr" strings (empty without the extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(f"DNS:{d}" for d in ext.get_values_for_type(x509.DNSName)) + tuple(
        f"IP:{a}" for a in ext.get_values_for_type(x509.IPAddress)
    )


def is_ca(cert: x509.Certificate) -> bool:
    """Whether basicConstraints marks the certificate as a CA."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def signed_by(ca: x509.Certificate, leaf: x509.Certificate) -> bool:
    """Whether `leaf` is directly issued and signed by `ca`."""
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def cert_expiry_days(cert: CertLike, now: dt.datetime | None = None) -> int:
    """Whole days until the certificate expires (negative once expired), for monitoring and `show`."""
    remaining = as_cert(cert).not_valid_after_utc - (as_utc(now) if now else utc_now())
    return math.floor(remaining.total_seconds() / 86400)


def verify_chain(
    ca_crt: CertLike,
    cert: CertLike,
    *,
    hostname: str | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Raise PkiError unless `cert` is signed by the CA and both are within validity (optionally valid for `hostname`)."""
    ca, leaf = as_cert(ca_crt), as_cert(cert)
    label = str(cert) if not isinstance(cert, x509.Certificate) else leaf.subject.rfc4514_string()
    at = as_utc(now) if now else utc_now()
    if not is_ca(ca):
        raise PkiError(f"{ca.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA=False)")
    if not signed_by(ca, leaf):
        raise PkiError(f"{label} is not signed by CA {ca.subject.rfc4514_string()}")
    for what, c in (("CA certificate", ca), (label, leaf)):
        if at < c.not_valid_before_utc:
            raise PkiError(f"{what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if at > c.not_valid_after_utc:
            raise PkiError(f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if hostname is not None and not _valid_for(leaf, hostname):
        raise PkiError(f"{label} is not valid for {hostname!r} (SANs: {', '.join(sans(leaf)) or 'none'})")


def _valid_for(leaf: x509.Certificate, hostname: str) -> bool:
    """Whether a SAN covers `hostname`: an IP literal against IP SANs, a name against DNS SANs (one-label wildcards)."""
    names = sans(leaf)
    try:
        return f"IP:{ipaddress.ip_address(hostname.strip('[]'))}" in names
    except ValueError:
        host = hostname.lower().rstrip(".")
        return any(_dns_match(s[4:], host) for s in names if s.startswith("DNS:"))


def _dns_match(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host
