"""`fedseek certs show`: every certificate and key under a certificates directory, with the problems to fix."""

from __future__ import annotations

import datetime as dt
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedseek.ops.pki.checks import as_utc, cert_expiry_days, cert_sha256, is_ca, sans, signed_by, utc_now
from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.files import load_cert, load_private_key
from fedseek.ops.pki.issue import LOOPBACK_IP
from fedseek.ops.pki.keys import describe_key, same_public_key, ssh_fingerprint
from fedseek.ops.pki.layout import CA_CRT, SITES_DIR

_OPENSSH = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


@dataclass(frozen=True)
class CertInfo:
    """One certificate or key found by `show`, with the facts an operator checks."""

    path: Path
    kind: str  # "ca" | "server" | "certificate" | "private-key" | "site-key"
    key_type: str  # e.g. "EC P-384", "RSA 3072"
    subject: str | None = None
    issuer: str | None = None
    sans: tuple[str, ...] = ()
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    days_left: int | None = None
    expired: bool = False
    fingerprint: str | None = None
    site: str | None = None
    problems: tuple[str, ...] = field(default_factory=tuple)


def _mode_problem(path: Path) -> tuple[str, ...]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return (f"private key mode {mode:04o}: readable by others, chmod 600",)
    return ()


def _cert_kind(cert: x509.Certificate) -> str:
    """The certificate's kind: "ca", "server" (EKU serverAuth) or plain "certificate"."""
    if is_ca(cert):
        return "ca"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "certificate"
    return "server" if ExtendedKeyUsageOID.SERVER_AUTH in eku else "certificate"


def _cert_problems(path: Path, cert: x509.Certificate, kind: str, ca: x509.Certificate | None, site: str | None,
                   now: dt.datetime) -> list[str]:
    """Stale bundled CA, foreign issuer, missing loopback SAN, expiry."""
    problems: list[str] = []
    if ca is not None and path.name == CA_CRT and kind == "ca" and site is not None:
        if cert.fingerprint(hashes.SHA256()) != ca.fingerprint(hashes.SHA256()):
            problems.append(f"differs from {CA_CRT} of the coordinator: give the site a new bundle")
    elif ca is not None and kind != "ca" and not signed_by(ca, cert):
        problems.append(f"not signed by {CA_CRT} ({ca.subject.rfc4514_string()})")
    if kind == "server" and f"IP:{LOOPBACK_IP}" not in sans(cert) and "IP:::1" not in sans(cert):
        problems.append("no SAN IP:127.0.0.1: Flower's SuperExec cannot connect, runs stay pending")
    if now > cert.not_valid_after_utc:
        problems.append(f"expired {-cert_expiry_days(cert, now)} day(s) ago")
    elif now < cert.not_valid_before_utc:
        problems.append("not yet valid")
    return problems


def _cert_info(path: Path, ca: x509.Certificate | None, site: str | None, now: dt.datetime) -> CertInfo:
    try:
        cert = load_cert(path)
    except PkiError as err:
        return CertInfo(path=path, kind="certificate", key_type="?", site=site, problems=(str(err),))
    kind = _cert_kind(cert)
    return CertInfo(
        path=path,
        kind=kind,
        key_type=describe_key(cert.public_key()),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=sans(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        days_left=cert_expiry_days(cert, now),
        expired=now > cert.not_valid_after_utc,
        fingerprint=cert_sha256(cert),
        site=site,
        problems=tuple(_cert_problems(path, cert, kind, ca, site, now)),
    )


def _key_info(path: Path, certs: dict[str, x509.Certificate]) -> CertInfo:
    problems = list(_mode_problem(path))
    try:
        key = load_private_key(path)
    except PkiError as err:
        return CertInfo(path=path, kind="private-key", key_type="?", problems=(*problems, str(err)))
    match = certs.get(path.stem)
    if match is not None and not same_public_key(match.public_key(), key.public_key()):
        problems.append(f"does not match {path.stem}.crt")
    return CertInfo(path=path, kind="private-key", key_type=describe_key(key), problems=tuple(problems))


def _site_public_key(pub: Path, problems: list[str]) -> tuple[PublicKeyTypes | None, str, str | None]:
    """The site's public key file: (key or None, key type, fingerprint); problems appended."""
    if not pub.exists():
        problems.append(f"missing {pub.name}")
        return None, "?", None
    data = pub.read_bytes()
    try:
        public = serialization.load_ssh_public_key(data)
        return public, describe_key(public), ssh_fingerprint(data)
    except (ValueError, UnsupportedAlgorithm, PkiError):
        problems.append(f"{pub.name} is not an OpenSSH public key")
        return None, "?", None


def _site_key_info(site_dir: Path) -> CertInfo:
    name = site_dir.name
    pub, priv = site_dir / f"{name}.pub", site_dir / name
    problems: list[str] = []
    public, key_type, fingerprint = _site_public_key(pub, problems)
    if priv.exists():
        problems.extend(_mode_problem(priv))
        try:
            private = serialization.load_ssh_private_key(priv.read_bytes(), password=None)
            if public is not None and private.public_key().public_bytes(*_OPENSSH) != public.public_bytes(*_OPENSSH):
                problems.append(f"{priv.name} does not match {pub.name}")
        except (ValueError, UnsupportedAlgorithm):
            problems.append(f"{priv.name} is not an OpenSSH private key")
    # A bundle whose private key was already handed over (and removed here) is fine.
    return CertInfo(
        path=pub, kind="site-key", key_type=key_type, fingerprint=fingerprint, site=name, problems=tuple(problems)
    )


def _load_ca(certs_dir: Path) -> x509.Certificate | None:
    try:
        return load_cert(certs_dir / CA_CRT) if (certs_dir / CA_CRT).exists() else None
    except PkiError:
        return None


def show(certs_dir: Path, now: dt.datetime | None = None) -> list[CertInfo]:
    """Inventory of certificates and keys under certs_dir: validity, SANs, key types, site key fingerprints, problems."""
    certs_dir = Path(certs_dir)
    if not certs_dir.is_dir():
        raise PkiError(f"no certificates directory at {certs_dir}: run `fedseek certs init` first")
    at = as_utc(now) if now else utc_now()
    ca = _load_ca(certs_dir)
    infos: list[CertInfo] = []
    cert_paths = sorted(
        certs_dir.glob("*.crt"), key=lambda p: (p.name != CA_CRT, p.name)
    ) + sorted(p for p in certs_dir.glob("*.pem") if "-----BEGIN CERTIFICATE" in p.read_text(errors="ignore"))
    loaded: dict[str, x509.Certificate] = {}
    for path in cert_paths:
        infos.append(_cert_info(path, ca, None, at))
        try:
            loaded[path.stem] = load_cert(path)
        except PkiError:
            pass
    infos.extend(_key_info(path, loaded) for path in sorted(certs_dir.glob("*.key")))
    sites_root = certs_dir / SITES_DIR
    if sites_root.is_dir():
        for site_dir in sorted(p for p in sites_root.iterdir() if p.is_dir()):
            infos.append(_site_key_info(site_dir))
            bundled_ca = site_dir / CA_CRT
            if bundled_ca.exists():
                infos.append(_cert_info(bundled_ca, ca, site_dir.name, at))
    return infos


def format_show(infos: list[CertInfo]) -> str:
    """Render `show` output as plain text for the CLI (one block per item, problems marked '!')."""
    if not infos:
        return "no certificates or keys found"
    lines: list[str] = []
    for info in infos:
        head = f"{info.kind:<12} {info.path}"
        if info.site:
            head += f"  [site {info.site}]"
        lines.append(head)
        lines.append(f"  key          {info.key_type}")
        if info.subject is not None:
            lines.append(f"  subject      {info.subject}")
            lines.append(f"  issuer       {info.issuer}")
        if info.sans:
            lines.append(f"  SANs         {', '.join(info.sans)}")
        if info.not_after is not None and info.not_before is not None:
            status = "EXPIRED" if info.expired else f"{info.days_left} days left"
            lines.append(
                f"  valid        {info.not_before:%Y-%m-%d} .. {info.not_after:%Y-%m-%d} ({status})"
            )
        if info.fingerprint:
            lines.append(f"  fingerprint  {info.fingerprint}")
        lines.extend(f"  ! {p}" for p in info.problems)
    return "\n".join(lines)
