"""Site key custody: a site makes its own keys and a certificate request; the coordinator signs, renews and revokes.

Site side (`fedseek certs request NAME --out DIR`): a Flower node key pair (OpenSSH ECDSA P-384)
and a TLS key (EC P-256) are generated on the site's machine and never leave it; what goes to the
coordinator is public: `NAME.csr` (certificate request, CN = NAME) and `NAME.pub` (node key).

Coordinator side (`fedseek certs sign NAME.csr --pub NAME.pub`): the request's signature and name
are checked, a short-lived site certificate (clientAuth, CN = NAME) is issued from the CA, and the
public node key is kept under `sites/NAME/` to be registered with Flower. `certs renew NAME`
re-signs the kept request (no private key needed); `certs revoke NAME` adds every certificate
issued to NAME to `revoked.json`, which the coordinator endpoint re-reads without a restart.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseek.ops.pki.checks import utc_now
from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.files import PRIVATE_MODE, load_cert, load_private_key, public_mode, refuse_existing, write_file
from fedseek.ops.pki.issue import CLOCK_SKEW
from fedseek.ops.pki.keys import new_site_key, ssh_fingerprint
from fedseek.ops.pki.layout import CA_CRT, CA_KEY, SITES_DIR
from fedseek.ops.pki.sites import validate_site_name

DEFAULT_SITE_CERT_DAYS = 30
ISSUED_JSON = "issued.json"
REVOKED_JSON = "revoked.json"


@dataclass(frozen=True)
class SiteRequest:
    """What `certs request` wrote on the site: private keys (stay) and the public request (goes to the coordinator)."""

    name: str
    node_key: Path
    node_pub: Path
    tls_key: Path
    csr: Path
    fingerprint: str


@dataclass(frozen=True)
class SignedSite:
    """What `certs sign`/`renew` wrote on the coordinator: the site certificate to send back, the kept public material."""

    name: str
    cert: Path
    ca: Path
    node_pub: Path
    serial: str
    not_after: dt.datetime


def request_site(out_dir: Path, name: str, *, force: bool = False) -> SiteRequest:
    """Generate the site's node key, TLS key and certificate request in `out_dir` (private keys 0600)."""
    validate_site_name(name)
    out_dir = Path(out_dir)
    req = SiteRequest(name, out_dir / name, out_dir / f"{name}.pub", out_dir / f"{name}.tls.key", out_dir / f"{name}.csr", "")
    refuse_existing([req.node_key, req.node_pub, req.tls_key, req.csr], force)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_ssh, public_ssh = new_site_key(name)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseek"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(tls_key, hashes.SHA256()))
    write_file(req.node_key, private_ssh, PRIVATE_MODE, overwrite=force)
    write_file(req.tls_key, tls_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), PRIVATE_MODE, overwrite=force)
    write_file(req.node_pub, public_ssh, public_mode(), overwrite=force)
    write_file(req.csr, csr.public_bytes(serialization.Encoding.PEM), public_mode(), overwrite=force)
    return SiteRequest(name, req.node_key, req.node_pub, req.tls_key, req.csr, ssh_fingerprint(public_ssh))


def _load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(Path(path).read_bytes())
    except OSError as exc:
        raise PkiError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:
        raise PkiError(f"{path}: not a PEM certificate request (make it with `fedseek certs request NAME`)") from None
    try:
        valid = csr.is_signature_valid
    except ValueError:  # an unreadable public key in the request
        valid = False
    if not valid:
        raise PkiError(f"{path}: the request's signature does not verify (corrupted or forged)")
    return csr


def _csr_name(csr: x509.CertificateSigningRequest, path: Path) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError(f"{path}: the request must name exactly one site (CN)")
    return validate_site_name(str(names[0].value))


def _node_pub(path: Path) -> bytes:
    try:
        line = Path(path).read_bytes()
        key = serialization.load_ssh_public_key(line)
    except OSError as exc:
        raise PkiError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{path}: not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{path}: Flower node keys are ECDSA on a NIST curve")
    return line


def _issue(certs_dir: Path, csr: x509.CertificateSigningRequest, name: str, days: int) -> x509.Certificate:
    if days < 1:
        raise PkiError(f"site certificates need at least 1 day of validity, got {days}")
    ca_cert, ca_key = load_cert(certs_dir / CA_CRT), load_private_key(certs_dir / CA_KEY)
    start = utc_now() - CLOCK_SKEW
    end = min(utc_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseek"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(csr.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA384() if isinstance(ca_key, ec.EllipticCurvePrivateKey) else hashes.SHA256()))


def _read_json(path: Path, default: dict) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: unreadable ({exc}); fix or remove it") from None
    if not isinstance(data, dict):
        raise PkiError(f"{path}: expected a JSON object")
    return data


def _record_issue(certs_dir: Path, name: str, cert: x509.Certificate) -> None:
    from fedseek.files import atomic_write_json

    path = certs_dir / ISSUED_JSON
    data = _read_json(path, {"certificates": []})
    data["certificates"].append({"site": name, "serial": format(cert.serial_number, "x"),
                                 "not_after": cert.not_valid_after_utc.isoformat()})
    atomic_write_json(path, data, mode=0o644)


def _write_signed(certs_dir: Path, name: str, cert: x509.Certificate) -> SignedSite:
    site_dir = certs_dir / SITES_DIR / name
    path = site_dir / f"{name}.crt"
    write_file(path, cert.public_bytes(serialization.Encoding.PEM), public_mode())
    write_file(site_dir / CA_CRT, (certs_dir / CA_CRT).read_bytes(), public_mode())
    _record_issue(certs_dir, name, cert)
    return SignedSite(name, path, site_dir / CA_CRT, site_dir / f"{name}.pub", format(cert.serial_number, "x"),
                      cert.not_valid_after_utc)


def sign_request(certs_dir: Path, csr_path: Path, pub_path: Path, *, days: int = DEFAULT_SITE_CERT_DAYS,
                 force: bool = False) -> SignedSite:
    """Check a site's request and node key, issue its certificate, keep its public material under sites/NAME/."""
    certs_dir = Path(certs_dir)
    if not (certs_dir / CA_KEY).is_file():
        raise PkiError(f"no CA key at {certs_dir / CA_KEY}: run `fedseek certs init` first (on the coordinator)")
    csr = _load_csr(csr_path)
    name = _csr_name(csr, csr_path)
    line = _node_pub(pub_path)
    site_dir = certs_dir / SITES_DIR / name
    kept_pub = site_dir / f"{name}.pub"
    if kept_pub.is_file() and kept_pub.read_bytes().split()[:2] != line.split()[:2] and not force:
        raise PkiError(f"site {name!r} is already registered with another node key ({kept_pub}); "
                       "revoke it and sign with --force to replace the site's identity")
    (certs_dir / SITES_DIR).mkdir(exist_ok=True, mode=0o700)
    site_dir.mkdir(exist_ok=True, mode=0o700)
    write_file(kept_pub, line, public_mode())
    write_file(site_dir / f"{name}.csr", csr.public_bytes(serialization.Encoding.PEM), public_mode())
    return _write_signed(certs_dir, name, _issue(certs_dir, csr, name, days))


def renew_site(certs_dir: Path, name: str, *, days: int = DEFAULT_SITE_CERT_DAYS) -> SignedSite:
    """A new certificate for the key in the site's kept request (the site keeps its keys; send it the new NAME.crt)."""
    certs_dir = Path(certs_dir)
    validate_site_name(name)
    kept = certs_dir / SITES_DIR / name / f"{name}.csr"
    if not kept.is_file():
        raise PkiError(f"no request kept for {name!r} at {kept}: the site runs `fedseek certs request {name}` and you sign it")
    csr = _load_csr(kept)
    return _write_signed(certs_dir, name, _issue(certs_dir, csr, _csr_name(csr, kept), days))


def revoke_site(certs_dir: Path, name: str) -> list[str]:
    """Revoke every certificate issued to `name` (serials into revoked.json); returns the newly revoked serials."""
    from fedseek.files import atomic_write_json

    certs_dir = Path(certs_dir)
    validate_site_name(name)
    issued = [c["serial"] for c in _read_json(certs_dir / ISSUED_JSON, {"certificates": []})["certificates"] if c.get("site") == name]
    if not issued:
        raise PkiError(f"no certificate was issued to {name!r} from {certs_dir}")
    path = certs_dir / REVOKED_JSON
    data = _read_json(path, {"serials": []})
    new = [s for s in issued if s not in data["serials"]]
    data["serials"] = sorted({*data["serials"], *issued})
    data.setdefault("sites", {})[name] = utc_now().replace(microsecond=0).isoformat()
    atomic_write_json(path, data, mode=0o644)
    return new
