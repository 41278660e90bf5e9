"""PKI files on disk: PEM certificates and keys, loaded with one-line errors and written durably with their mode.

Writes go through fedseek.files' atomic writer (temp file created with the final mode, fsync,
rename, directory fsync): a crash leaves the old file or the new one, and a symlink at the target
is replaced, never followed. Callers check every target up front with `refuse_existing`, so a
refused operation writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedseek.files import atomic_write_bytes
from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.keys import PrivateKey, describe_key

PRIVATE_MODE = 0o600  # exactly, whatever the umask
PUBLIC_MODE = 0o644  # narrowed by the umask, as a plain file create would be


def public_mode() -> int:
    """PUBLIC_MODE less the process umask (certificates and bundle files are public, but a strict umask wins)."""
    umask = os.umask(0)
    os.umask(umask)
    return PUBLIC_MODE & ~umask


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Refuse, before anything is written, if any target exists and force is off (or is a directory)."""
    for path in paths:
        if path.exists() or path.is_symlink():
            if not force:
                raise PkiError(_refusal(path))
            if path.is_dir():
                raise PkiError(f"{path} is a directory, expected a file")


def _refusal(path: Path) -> str:
    return f"refusing to overwrite existing {path}: pass --force to replace it"


def write_file(path: Path, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Write `data` atomically with exactly `mode`; a missing parent is created 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        atomic_write_bytes(path, data, mode=mode, overwrite=overwrite)
    except FileExistsError:  # appeared after refuse_existing checked
        raise PkiError(_refusal(path)) from None


def write_private_key(path: Path, key: PrivateKey, *, overwrite: bool = True) -> None:
    """Write a private key as unencrypted PKCS#8 PEM, created 0600 (what uvicorn/ssl load)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(path, data, PRIVATE_MODE, overwrite=overwrite)


def write_cert(path: Path, cert: x509.Certificate, *, overwrite: bool = True) -> None:
    """Write a certificate as PEM (0644 less the umask: certificates are public)."""
    write_file(path, cert.public_bytes(serialization.Encoding.PEM), public_mode(), overwrite=overwrite)


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
    """Load an unencrypted PEM private key (EC or RSA), with a one-line error naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PkiError(f"cannot read private key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path}: unsupported key type {describe_key(key)} (need EC or RSA)")
    return key
