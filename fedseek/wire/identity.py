"""A site's identity is its registered public key; keys are compared as DER SubjectPublicKeyInfo (SPKI).

Flower's SuperNode authentication (`--enable-supernode-auth`) maps the key that signed a
Fleet request to a node id; the coordinator maps that key back to the site registered with it
(`sites[].public_key`). These helpers turn the forms a key comes in (the OpenSSH `.pub` file
`fedseek certs add-site` writes, the PEM Flower's NodeInfo and Control API carry) into the one
form they are compared in. Used by the operator tooling (registration) and by the coordinator
(runtime.identity), so it lives below both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class KeyFileError(ValueError):
    """A site's public key file that is missing, unreadable or not a key Flower's node auth accepts (the message names the site)."""


def spki(key: Any) -> bytes:
    """A public key as DER SubjectPublicKeyInfo (the form keys are compared in)."""
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def pem_spki(pem: bytes) -> bytes:
    """A node's PEM public key (as Flower's NodeInfo carries it) as DER SPKI; b'' if unreadable."""
    from cryptography.hazmat.primitives import serialization

    try:
        return spki(serialization.load_pem_public_key(bytes(pem)))
    except (ValueError, TypeError):
        return b""


def openssh_spki(data: bytes) -> bytes:
    """An OpenSSH public key line as DER SPKI; ValueError unless it is an ECDSA key on a NIST curve (Flower's node auth)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("is not an OpenSSH public key (fedseek certs request writes NAME.pub)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("must be an ECDSA key on a NIST curve (Flower's SuperNode auth)")
    return spki(key)


def read_site_keys(sites: Iterable[tuple[str, str | Path]]) -> dict[str, bytes]:
    """Each (site name, OpenSSH .pub path) as name -> DER SPKI; KeyFileError naming the site and file otherwise."""
    keys: dict[str, bytes] = {}
    for name, path in sites:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"site {name}: public key {p}: {exc.strerror or exc}") from None
        try:
            keys[name] = openssh_spki(data)
        except ValueError as exc:
            raise KeyFileError(f"site {name}: {p} {exc}") from None
    return keys


def fingerprint(der: bytes) -> str:
    """A short, loggable fingerprint of a DER key (SHA-256, first 16 hex digits)."""
    return hashlib.sha256(der).hexdigest()[:16]
