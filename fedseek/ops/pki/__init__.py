"""PKI for a fedseek federation: CA, coordinator TLS certificate and site (SuperNode) keys.

What Flower 1.41 needs (reference/flower-1.41.md section 4):

* SuperLink: ``--ssl-ca-certfile ca.crt --ssl-certfile coordinator.crt --ssl-keyfile
  coordinator.key``. The server certificate must carry SAN ``IP:127.0.0.1``: Flower's internal
  SuperExec connects to 127.0.0.1 and a run otherwise stays ``pending`` forever.
* SuperNode: ``--root-certificates ca.crt`` (server verification only; there is no mutual TLS)
  and ``--auth-supernode-private-key KEY``: an EC key on a NIST curve in OpenSSH format, whose
  public half the operator registers with ``flwr supernode register KEY.pub``.

Layout written under ``certs_dir`` (``layout``)::

    ca.crt  ca.key                  CA (key 0600)
    coordinator.crt  coordinator.key   SuperLink server certificate (key 0600)
    sites/NAME/NAME  NAME.pub       site auth key pair, OpenSSH, ECDSA P-384 (private 0600)
    sites/NAME/ca.crt               copy of the CA: the site's --root-certificates
    sites/NAME/site.yaml            snippet for the site config (paths relative to the bundle)
    sites/NAME/bundle.json          same facts, machine-readable, with fingerprints

Modules: ``issue`` (certificates in memory), ``ca`` (CA and coordinator certificate on disk),
``sites`` (site bundles), ``checks`` (chain, validity, host name), ``inventory`` (``certs show``),
``files`` (PEM files, written atomically), ``keys`` (key material), ``layout`` (file names).
"""

from fedseek.ops.pki.ca import init_ca, issue_coordinator_cert
from fedseek.ops.pki.checks import cert_expiry_days, verify_chain
from fedseek.ops.pki.errors import PkiError
from fedseek.ops.pki.files import load_cert, load_private_key, write_cert, write_private_key
from fedseek.ops.pki.inventory import CertInfo, format_show, show
from fedseek.ops.pki.issue import DEFAULT_CA_DAYS, issue_ca, issue_server_cert
from fedseek.ops.pki.keys import KEY_TYPES, PrivateKey, ssh_fingerprint
from fedseek.ops.pki.layout import (
    BUNDLE_JSON,
    CA_CRT,
    CA_KEY,
    COORDINATOR_CRT,
    COORDINATOR_KEY,
    SITE_YAML,
    SITES_DIR,
    CertPaths,
    SiteBundle,
)
from fedseek.ops.pki.sites import add_site, validate_site_name

__all__ = [
    "BUNDLE_JSON",
    "CA_CRT",
    "CA_KEY",
    "COORDINATOR_CRT",
    "COORDINATOR_KEY",
    "DEFAULT_CA_DAYS",
    "KEY_TYPES",
    "SITES_DIR",
    "SITE_YAML",
    "CertInfo",
    "CertPaths",
    "PkiError",
    "PrivateKey",
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
    "show",
    "ssh_fingerprint",
    "validate_site_name",
    "verify_chain",
    "write_cert",
    "write_private_key",
]
