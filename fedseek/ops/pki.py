"""PKI for a fedseek federation: CA, coordinator TLS certificate and site (SuperNode) keys.

What Flower 1.41 needs (reference/flower-1.41.md section 4):

* SuperLink: ``--ssl-ca-certfile ca.crt --ssl-certfile coordinator.crt --ssl-keyfile
  coordinator.key``. The server certificate must carry SAN ``IP:127.0.0.1``: Flower's internal
  SuperExec connects to 127.0.0.1 and a run otherwise stays ``pending`` forever.
* SuperNode: ``--root-certificates ca.crt`` (server verification only; there is no mutual TLS)
  and ``--auth-supernode-private-key KEY``: an EC key on a NIST curve in OpenSSH format, whose
  public half the operator registers with ``flwr supernode register KEY.pub``.

Layout written under ``certs_dir``::

    ca.crt  ca.key                  CA (key 0600)
    coordinator.crt  coordinator.key   SuperLink server certificate (key 0600)
    sites/NAME/NAME  NAME.pub       site auth key pair, OpenSSH, ECDSA P-384 (private 0600)
    sites/NAME/ca.crt               copy of the CA: the site's --root-certificates
    sites/NAME/site.yaml            snippet for the site config (paths relative to the bundle)
    sites/NAME/bundle.json          same facts, machine-readable, with fingerprints
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CRT",
    "CA_KEY",
    "COORDINATOR_CRT",
    "COORDINATOR_KEY",
    "CertInfo",
    "CertPaths",
    "PkiError",
    "SiteBundle",
    "add_site",
    "cert_expiry_days",
    "format_show",
    "init_ca",
    "issue_ca",
    "issue_coordinator_cert",
    "issue_server_cert",
    "load_cert",
    "load_private_key",
    "ssh_fingerprint",
    "show",
    "validate_site_name",
    "verify_chain",
    "write_cert",
    "write_private_key",
]

CA_CRT = "ca.crt"
CA_KEY = "ca.key"
COORDINATOR_CRT = "coordinator.crt"
COORDINATOR_KEY = "coordinator.key"
SITES_DIR = "sites"
SITE_YAML = "site.yaml"
BUNDLE_JSON = "bundle.json"

LOOPBACK_IP = "127.0.0.1"
LOOPBACK_DNS = "localhost"
DEFAULT_CA_DAYS = 3650
# Backdate notBefore a little so a site whose clock runs slightly behind still accepts a
# certificate issued a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)
KEY_TYPES = ("ec", "rsa")
RSA_BITS = 3072

_SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_DNS_LABEL_RE = re.compile(r"^(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)$")

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
CertLike = Union[Path, str, x509.Certificate]


class PkiError(Exception):
    """A PKI operation failed; the message is one line meant for the operator."""


@dataclass(frozen=True)
class CertPaths:
    """Where `init_ca` wrote the CA and the coordinator certificate."""

    out_dir: Path
    ca_crt: Path
    ca_key: Path
    coordinator_crt: Path
    coordinator_key: Path


@dataclass(frozen=True)
class SiteBundle:
    """A site's key pair plus what the site needs to reach and trust the coordinator."""

    name: str
    dir: Path
    private_key: Path
    public_key: Path
    ca_crt: Path
    site_yaml: Path
    bundle_json: Path
    coordinator_address: str
    fingerprint: str  # OpenSSH style "SHA256:<base64>", same as `ssh-keygen -lf NAME.pub`


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


# --------------------------------------------------------------------------- helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key(key_type: str, curve: ec.EllipticCurve) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(curve)
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise PkiError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def _describe_key(key: object) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"EC {names.get(key.curve.name, key.curve.name)}"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA {key.key_size}"
    return type(key).__name__


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _validity(
    days: int, not_valid_before: dt.datetime | None, not_valid_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    if not_valid_after is None and days < 1:
        raise PkiError(f"validity must be at least 1 day, got days={days}")
    start = _aware(not_valid_before) if not_valid_before else _now() - CLOCK_SKEW
    end = _aware(not_valid_after) if not_valid_after else _now() + dt.timedelta(days=days)
    if end <= start:
        raise PkiError(f"certificate would never be valid: not_after {end:%Y-%m-%d %H:%M} "
                       f"is not after not_before {start:%Y-%m-%d %H:%M}")
    return start, end


def _split_names(hosts: list[str], ips: list[str], include_loopback: bool) -> list[x509.GeneralName]:
    """Build SANs: DNS for names, IP for addresses (IP literals given as hosts move to IP)."""
    dns: list[str] = [LOOPBACK_DNS] if include_loopback else []
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = (
        [ipaddress.ip_address(LOOPBACK_IP)] if include_loopback else []
    )
    for raw in ips:
        try:
            addr = ipaddress.ip_address(raw.strip().strip("[]"))
        except ValueError:
            raise PkiError(f"not an IP address: {raw!r} (give DNS names as hosts)") from None
        if addr not in addrs:
            addrs.append(addr)
    for raw in hosts:
        host = raw.strip().lower().rstrip(".")
        try:  # a Python TLS client checks an IP literal against IP SANs only
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            if addr not in addrs:
                addrs.append(addr)
            continue
        if not host or len(host) > 253 or not all(
            _DNS_LABEL_RE.match(label) for label in host.split(".")
        ):
            raise PkiError(f"not a valid DNS name: {raw!r} (no scheme or port, e.g. coord.example.org)")
        if host not in dns:
            dns.append(host)
    if not dns and not addrs:
        raise PkiError("a server certificate needs at least one host or IP address")
    return [x509.DNSName(d) for d in dns] + [x509.IPAddress(a) for a in addrs]


def _atomic_targets(paths: list[Path], force: bool) -> None:
    """Refuse, before anything is written, if any target exists and force is off."""
    for path in paths:
        if path.exists() or path.is_symlink():
            if not force:
                raise PkiError(f"refusing to overwrite existing {path}: pass --force to replace it")
            if path.is_dir():
                raise PkiError(f"{path} is a directory, expected a file")


def _write_bytes(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (O_EXCL), replacing an old file if present."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        path.unlink()  # callers checked force; unlinking first makes the new mode stick
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write a private key as unencrypted PKCS#8 PEM, created 0600 (what uvicorn/ssl load)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_bytes(path, data, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    """Write a certificate as PEM (0644: certificates are public)."""
    _write_bytes(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_cert(path: Path | str) -> x509.Certificate:
    """Load a PEM (or DER) certificate, with a one-line error naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PkiError(f"cannot read certificate {path}: {err.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path} is not a valid X.509 certificate") from None


def load_private_key(path: Path | str) -> PrivateKey:
    """Load an unencrypted PEM private key, with a one-line error naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PkiError(f"cannot read private key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PkiError(f"{path}: unsupported key type {_describe_key(key)} (need EC or RSA)")
    return key


def _as_cert(value: CertLike) -> x509.Certificate:
    return value if isinstance(value, x509.Certificate) else load_cert(value)


def _cert_sha256(cert: x509.Certificate) -> str:
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ssh_fingerprint(public_key_line: bytes | str) -> str:
    """OpenSSH SHA-256 fingerprint of a public key line, identical to `ssh-keygen -lf`."""
    if isinstance(public_key_line, str):
        public_key_line = public_key_line.encode()
    parts = public_key_line.split()
    if len(parts) < 2:
        raise PkiError("not an OpenSSH public key line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise PkiError("not an OpenSSH public key line (bad base64)") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(f"DNS:{d}" for d in ext.get_values_for_type(x509.DNSName)) + tuple(
        f"IP:{a}" for a in ext.get_values_for_type(x509.IPAddress)
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# --------------------------------------------------------------------------- issuing


def issue_ca(
    common_name: str = "fedseek CA",
    *,
    days: int = DEFAULT_CA_DAYS,
    key_type: str = "ec",
    not_valid_before: dt.datetime | None = None,
    not_valid_after: dt.datetime | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """Create a self-signed CA (CA=True, pathlen 0, keyCertSign) kept in memory; tests make 'another CA' with it."""
    key = _new_key(key_type, ec.SECP384R1())
    start, end = _validity(days, not_valid_before, not_valid_after)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseek"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384() if key_type == "ec" else hashes.SHA256())
    )
    return key, cert


def issue_server_cert(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    ips: list[str],
    *,
    days: int = 365,
    key_type: str = "ec",
    not_valid_before: dt.datetime | None = None,
    not_valid_after: dt.datetime | None = None,
    include_loopback: bool = True,
    common_name: str | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """Issue a TLS server certificate (EKU serverAuth) signed by the CA; an explicit window allows expired certs for tests."""
    if not _is_ca(ca_cert):
        raise PkiError(f"issuer {ca_cert.subject.rfc4514_string()} is not a CA certificate")
    sans = _split_names(hosts, ips, include_loopback)
    key = _new_key(key_type, ec.SECP256R1())
    start, end = _validity(days, not_valid_before, not_valid_after)
    if not_valid_after is None and end > ca_cert.not_valid_after_utc:
        end = ca_cert.not_valid_after_utc  # a chain is only as valid as its CA
    first_dns = next((s.value for s in sans if isinstance(s, x509.DNSName)), None)
    cn = common_name or next((h for h in hosts if h), None) or first_dns or "fedseek coordinator"
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseek"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384() if isinstance(ca_key, ec.EllipticCurvePrivateKey) else hashes.SHA256())
    )
    return key, cert


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
    paths = CertPaths(
        out_dir=out_dir,
        ca_crt=out_dir / CA_CRT,
        ca_key=out_dir / CA_KEY,
        coordinator_crt=out_dir / COORDINATOR_CRT,
        coordinator_key=out_dir / COORDINATOR_KEY,
    )
    _atomic_targets([paths.ca_crt, paths.ca_key, paths.coordinator_crt, paths.coordinator_key], force)
    ca_key, ca_cert = issue_ca(days=max(ca_days, days), key_type=key_type)
    srv_key, srv_cert = issue_server_cert(ca_key, ca_cert, hosts, ips, days=days, key_type=key_type)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_key(paths.ca_key, ca_key)
    write_cert(paths.ca_crt, ca_cert)
    write_private_key(paths.coordinator_key, srv_key)
    write_cert(paths.coordinator_crt, srv_cert)
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
    ca_crt, ca_key_path = certs_dir / CA_CRT, certs_dir / CA_KEY
    if not ca_crt.exists() or not ca_key_path.exists():
        raise PkiError(f"no CA in {certs_dir} (need {CA_CRT} and {CA_KEY}): run `fedseek certs init` first")
    paths = CertPaths(certs_dir, ca_crt, ca_key_path, certs_dir / COORDINATOR_CRT, certs_dir / COORDINATOR_KEY)
    _atomic_targets([paths.coordinator_crt, paths.coordinator_key], force)
    ca_cert, ca_key = load_cert(ca_crt), load_private_key(ca_key_path)
    if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
        raise PkiError(f"{ca_key_path} does not belong to {ca_crt}")
    srv_key, srv_cert = issue_server_cert(ca_key, ca_cert, hosts, ips, days=days, key_type=key_type)
    write_private_key(paths.coordinator_key, srv_key)
    write_cert(paths.coordinator_crt, srv_cert)
    return paths


# --------------------------------------------------------------------------- verifying


def cert_expiry_days(cert: CertLike, now: dt.datetime | None = None) -> int:
    """Whole days until the certificate expires (negative once expired), for monitoring and `show`."""
    remaining = _as_cert(cert).not_valid_after_utc - (_aware(now) if now else _now())
    return math.floor(remaining.total_seconds() / 86400)


def verify_chain(
    ca_crt: CertLike,
    cert: CertLike,
    *,
    hostname: str | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Raise PkiError unless `cert` is signed by the CA and both are within validity (optionally valid for `hostname`)."""
    ca, leaf = _as_cert(ca_crt), _as_cert(cert)
    label = str(cert) if not isinstance(cert, x509.Certificate) else leaf.subject.rfc4514_string()
    at = _aware(now) if now else _now()
    if not _is_ca(ca):
        raise PkiError(f"{ca.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA=False)")
    if not _signed_by(ca, leaf):
        raise PkiError(f"{label} is not signed by CA {ca.subject.rfc4514_string()}")
    for what, c in (("CA certificate", ca), (label, leaf)):
        if at < c.not_valid_before_utc:
            raise PkiError(f"{what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if at > c.not_valid_after_utc:
            raise PkiError(f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if hostname is not None:
        sans = _sans(leaf)
        try:
            wanted = f"IP:{ipaddress.ip_address(hostname.strip('[]'))}"
            ok = wanted in sans
        except ValueError:
            host = hostname.lower().rstrip(".")
            ok = any(_dns_match(s[4:], host) for s in sans if s.startswith("DNS:"))
        if not ok:
            raise PkiError(f"{label} is not valid for {hostname!r} (SANs: {', '.join(sans) or 'none'})")


def _signed_by(ca: x509.Certificate, leaf: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _dns_match(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


# --------------------------------------------------------------------------- sites


def validate_site_name(name: str) -> str:
    """Return `name` if usable as a site/file name (letters, digits, '-', '_'), else raise PkiError."""
    if not isinstance(name, str) or not _SITE_NAME_RE.match(name):
        raise PkiError(
            f"invalid site name {name!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def _parse_address(address: str) -> tuple[str, int]:
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


def add_site(
    certs_dir: Path,
    name: str,
    coordinator_address: str,
    force: bool = False,
) -> SiteBundle:
    """Create a site's ECDSA P-384 OpenSSH key pair and its bundle (CA copy, site.yaml, bundle.json) under sites/NAME/."""
    certs_dir = Path(certs_dir)
    validate_site_name(name)
    host, _port = _parse_address(coordinator_address)
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

    site_dir = certs_dir / SITES_DIR / name
    bundle = SiteBundle(
        name=name,
        dir=site_dir,
        private_key=site_dir / name,
        public_key=site_dir / f"{name}.pub",
        ca_crt=site_dir / CA_CRT,
        site_yaml=site_dir / SITE_YAML,
        bundle_json=site_dir / BUNDLE_JSON,
        coordinator_address=coordinator_address,
        fingerprint="",
    )
    reserved = {CA_CRT, SITE_YAML, BUNDLE_JSON}
    if name in reserved or f"{name}.pub" in reserved:
        raise PkiError(f"invalid site name {name!r}: clashes with a bundle file name")
    _atomic_targets(
        [bundle.private_key, bundle.public_key, bundle.ca_crt, bundle.site_yaml, bundle.bundle_json], force
    )

    key = ec.generate_private_key(ec.SECP384R1())  # what Flower itself generates
    private_ssh = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_ssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) + f" fedseek-site-{name}\n".encode()
    fingerprint = ssh_fingerprint(public_ssh)
    bundle = replace(bundle, fingerprint=fingerprint)

    facts = {
        "site": name,
        "coordinator_address": coordinator_address,
        "root_certificates": CA_CRT,
        "auth_private_key": name,
        "auth_public_key": f"{name}.pub",
        "public_key_fingerprint": fingerprint,
        "ca_fingerprint": _cert_sha256(ca_cert),
        "ca_not_after": ca_cert.not_valid_after_utc.isoformat(),
        "created": _now().replace(microsecond=0).isoformat(),
    }
    yaml_text = (
        f"# fedseek site bundle for {name!r}: copy this directory to the site; paths are relative to it.\n"
        f"# Coordinator operator registers the key: flwr supernode register {name}.pub <connection> --name {name}\n"
        f"# Public key fingerprint (compare out of band): {fingerprint}\n"
        f"# CA fingerprint: {facts['ca_fingerprint']}\n"
        "site:\n"
        f"  name: {json.dumps(name)}\n"
        f"  coordinator: {json.dumps(coordinator_address)}\n"
        f"  root_certificates: {json.dumps(CA_CRT)}\n"
        f"  auth_private_key: {json.dumps(name)}\n"
    )
    (certs_dir / SITES_DIR).mkdir(exist_ok=True, mode=0o700)
    site_dir.mkdir(exist_ok=True, mode=0o700)
    _write_bytes(bundle.private_key, private_ssh, 0o600)
    _write_bytes(bundle.public_key, public_ssh, 0o644)
    _write_bytes(bundle.ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_bytes(bundle.site_yaml, yaml_text.encode(), 0o644)
    _write_bytes(bundle.bundle_json, (json.dumps(facts, indent=2) + "\n").encode(), 0o644)
    return bundle


# --------------------------------------------------------------------------- show


def _mode_problem(path: Path) -> tuple[str, ...]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return (f"private key mode {mode:04o}: readable by others, chmod 600",)
    return ()


def _cert_info(path: Path, ca: x509.Certificate | None, site: str | None, now: dt.datetime) -> CertInfo:
    try:
        cert = load_cert(path)
    except PkiError as err:
        return CertInfo(path=path, kind="certificate", key_type="?", site=site, problems=(str(err),))
    problems: list[str] = []
    is_ca = _is_ca(cert)
    eku_server = False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        eku_server = ExtendedKeyUsageOID.SERVER_AUTH in eku
    except x509.ExtensionNotFound:
        pass
    kind = "ca" if is_ca else ("server" if eku_server else "certificate")
    if ca is not None and path.name == CA_CRT and is_ca and site is not None:
        if cert.fingerprint(hashes.SHA256()) != ca.fingerprint(hashes.SHA256()):
            problems.append(f"differs from {CA_CRT} of the coordinator: give the site a new bundle")
    elif ca is not None and not is_ca and not _signed_by(ca, cert):
        problems.append(f"not signed by {CA_CRT} ({ca.subject.rfc4514_string()})")
    if kind == "server" and f"IP:{LOOPBACK_IP}" not in _sans(cert) and "IP:::1" not in _sans(cert):
        problems.append("no SAN IP:127.0.0.1: Flower's SuperExec cannot connect, runs stay pending")
    days_left = cert_expiry_days(cert, now)
    expired = now > cert.not_valid_after_utc
    if expired:
        problems.append(f"expired {-days_left} day(s) ago")
    elif now < cert.not_valid_before_utc:
        problems.append("not yet valid")
    return CertInfo(
        path=path,
        kind=kind,
        key_type=_describe_key(cert.public_key()),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=_sans(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        days_left=days_left,
        expired=expired,
        fingerprint=_cert_sha256(cert),
        site=site,
        problems=tuple(problems),
    )


def _key_info(path: Path, certs: dict[str, x509.Certificate]) -> CertInfo:
    problems = list(_mode_problem(path))
    try:
        key = load_private_key(path)
    except PkiError as err:
        return CertInfo(path=path, kind="private-key", key_type="?", problems=(*problems, str(err)))
    match = certs.get(path.stem)
    if match is not None and match.public_key().public_numbers() != key.public_key().public_numbers():
        problems.append(f"does not match {path.stem}.crt")
    return CertInfo(path=path, kind="private-key", key_type=_describe_key(key), problems=tuple(problems))


def _site_key_info(site_dir: Path) -> CertInfo:
    name = site_dir.name
    pub, priv = site_dir / f"{name}.pub", site_dir / name
    problems: list[str] = []
    key_type, fingerprint = "?", None
    if pub.exists():
        data = pub.read_bytes()
        try:
            public = serialization.load_ssh_public_key(data)
            key_type = _describe_key(public)
            fingerprint = ssh_fingerprint(data)
        except (ValueError, UnsupportedAlgorithm, PkiError):
            problems.append(f"{pub.name} is not an OpenSSH public key")
            public = None
    else:
        problems.append(f"missing {pub.name}")
        public = None
    if priv.exists():
        problems.extend(_mode_problem(priv))
        try:
            private = serialization.load_ssh_private_key(priv.read_bytes(), password=None)
            if public is not None and private.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ) != public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH):
                problems.append(f"{priv.name} does not match {pub.name}")
        except (ValueError, UnsupportedAlgorithm):
            problems.append(f"{priv.name} is not an OpenSSH private key")
    # A bundle whose private key was already handed over (and removed here) is fine.
    return CertInfo(
        path=pub, kind="site-key", key_type=key_type, fingerprint=fingerprint, site=name, problems=tuple(problems)
    )


def show(certs_dir: Path, now: dt.datetime | None = None) -> list[CertInfo]:
    """Inventory of certificates and keys under certs_dir: validity, SANs, key types, site key fingerprints, problems."""
    certs_dir = Path(certs_dir)
    if not certs_dir.is_dir():
        raise PkiError(f"no certificates directory at {certs_dir}: run `fedseek certs init` first")
    at = _aware(now) if now else _now()
    ca_path = certs_dir / CA_CRT
    ca: x509.Certificate | None = None
    if ca_path.exists():
        try:
            ca = load_cert(ca_path)
        except PkiError:
            ca = None
    infos: list[CertInfo] = []
    cert_paths = sorted(
        certs_dir.glob("*.crt"), key=lambda p: (p.name != CA_CRT, p.name)
    ) + sorted(p for p in certs_dir.glob("*.pem") if "-----BEGIN CERTIFICATE" in p.read_text(errors="ignore"))
    loaded: dict[str, x509.Certificate] = {}
    for path in cert_paths:
        info = _cert_info(path, ca, None, at)
        infos.append(info)
        try:
            loaded[path.stem] = load_cert(path)
        except PkiError:
            pass
    for path in sorted(certs_dir.glob("*.key")):
        infos.append(_key_info(path, loaded))
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
