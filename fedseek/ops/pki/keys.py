"""Key material: generating and describing EC/RSA keys, comparing public keys, OpenSSH site keys and fingerprints."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes

from fedseek.ops.pki.errors import PkiError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KEY_TYPES = ("ec", "rsa")
RSA_BITS = 3072
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def new_key(key_type: str, curve: ec.EllipticCurve) -> PrivateKey:
    """A fresh private key: EC on `curve`, or RSA-3072; PkiError for any other type."""
    if key_type == "ec":
        return ec.generate_private_key(curve)
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise PkiError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def describe_key(key: object) -> str:
    """A short key description for operators, e.g. "EC P-384" or "RSA 3072"."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {_CURVE_NAMES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def same_public_key(a: CertificatePublicKeyTypes | PublicKeyTypes, b: CertificatePublicKeyTypes | PublicKeyTypes) -> bool:
    """Whether two public keys are the same key (compared as DER SubjectPublicKeyInfo)."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*spki) == b.public_bytes(*spki)


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


def new_site_key(name: str) -> tuple[bytes, bytes]:
    """A site's SuperNode auth key pair, ECDSA P-384 as Flower generates it: (OpenSSH private, public line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private_ssh = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_ssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) + f" fedseek-site-{name}\n".encode()
    return private_ssh, public_ssh
