"""Issuing certificates in memory: the federation CA and TLS server certificates (validity window, SANs, extensions)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseek.ops.pki.checks import as_utc, is_ca, utc_now
from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.keys import PrivateKey, new_key

LOOPBACK_IP = "127.0.0.1"
LOOPBACK_DNS = "localhost"
DEFAULT_CA_DAYS = 3650
# Backdate notBefore a little so a site whose clock runs slightly behind still accepts a
# certificate issued a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)

_DNS_LABEL_RE = re.compile(r"^(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)$")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _validity(
    days: int, not_valid_before: dt.datetime | None, not_valid_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    if not_valid_after is None and days < 1:
        raise PkiError(f"validity must be at least 1 day, got days={days}")
    start = as_utc(not_valid_before) if not_valid_before else utc_now() - CLOCK_SKEW
    end = as_utc(not_valid_after) if not_valid_after else utc_now() + dt.timedelta(days=days)
    if end <= start:
        raise PkiError(f"certificate would never be valid: not_after {end:%Y-%m-%d %H:%M} "
                       f"is not after not_before {start:%Y-%m-%d %H:%M}")
    return start, end


def _add_ip(addrs: list[IPAddress], addr: IPAddress) -> None:
    if addr not in addrs:
        addrs.append(addr)


def _split_names(hosts: list[str], ips: list[str], include_loopback: bool) -> list[x509.GeneralName]:
    """Build SANs: DNS for names, IP for addresses (IP literals given as hosts move to IP)."""
    dns: list[str] = [LOOPBACK_DNS] if include_loopback else []
    addrs: list[IPAddress] = [ipaddress.ip_address(LOOPBACK_IP)] if include_loopback else []
    for raw in ips:
        try:
            addr = ipaddress.ip_address(raw.strip().strip("[]"))
        except ValueError:
            raise PkiError(f"not an IP address: {raw!r} (give DNS names as hosts)") from None
        _add_ip(addrs, addr)
    for raw in hosts:
        host = raw.strip().lower().rstrip(".")
        try:  # a Python TLS client checks an IP literal against IP SANs only
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            _add_ip(addrs, addr)
            continue
        if not host or len(host) > 253 or not all(_DNS_LABEL_RE.match(label) for label in host.split(".")):
            raise PkiError(f"not a valid DNS name: {raw!r} (no scheme or port, e.g. coord.example.org)")
        if host not in dns:
            dns.append(host)
    if not dns and not addrs:
        raise PkiError("a server certificate needs at least one host or IP address")
    return [x509.DNSName(d) for d in dns] + [x509.IPAddress(a) for a in addrs]


def _key_usage(*, cert_sign: bool, key_encipherment: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a server signs handshakes (and, with RSA, enciphers keys)."""
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseek"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def issue_ca(
    common_name: str = "fedseek CA",
    *,
    days: int = DEFAULT_CA_DAYS,
    key_type: str = "ec",
    not_valid_before: dt.datetime | None = None,
    not_valid_after: dt.datetime | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """Create a self-signed CA (CA=True, pathlen 0, keyCertSign) kept in memory; tests make 'another CA' with it."""
    key = new_key(key_type, ec.SECP384R1())
    start, end = _validity(days, not_valid_before, not_valid_after)
    name = _name(common_name)
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
        .add_extension(_key_usage(cert_sign=True, key_encipherment=False), critical=True)
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
    if not is_ca(ca_cert):
        raise PkiError(f"issuer {ca_cert.subject.rfc4514_string()} is not a CA certificate")
    sans = _split_names(hosts, ips, include_loopback)
    key = new_key(key_type, ec.SECP256R1())
    start, end = _validity(days, not_valid_before, not_valid_after)
    if not_valid_after is None and end > ca_cert.not_valid_after_utc:
        end = ca_cert.not_valid_after_utc  # a chain is only as valid as its CA
    first_dns = next((s.value for s in sans if isinstance(s, x509.DNSName)), None)
    cn = common_name or next((h for h in hosts if h), None) or first_dns or "fedseek coordinator"
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn[:64]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False, key_encipherment=isinstance(key, rsa.RSAPrivateKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384() if isinstance(ca_key, ec.EllipticCurvePrivateKey) else hashes.SHA256())
    )
    return key, cert
