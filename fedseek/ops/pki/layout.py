"""Where the PKI's files live under a certificates directory, and the records that name them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CA_CRT = "ca.crt"
CA_KEY = "ca.key"
COORDINATOR_CRT = "coordinator.crt"
COORDINATOR_KEY = "coordinator.key"
SITES_DIR = "sites"
SITE_YAML = "site.yaml"
BUNDLE_JSON = "bundle.json"


@dataclass(frozen=True)
class CertPaths:
    """Where `init_ca` wrote the CA and the coordinator certificate."""

    out_dir: Path
    ca_crt: Path
    ca_key: Path
    coordinator_crt: Path
    coordinator_key: Path

    @classmethod
    def under(cls, out_dir: Path) -> CertPaths:
        """The standard file names under `out_dir`."""
        return cls(out_dir, out_dir / CA_CRT, out_dir / CA_KEY, out_dir / COORDINATOR_CRT, out_dir / COORDINATOR_KEY)


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

    @classmethod
    def under(cls, certs_dir: Path, name: str, coordinator_address: str, fingerprint: str = "") -> SiteBundle:
        """The bundle's file names under certs_dir/sites/NAME/."""
        site_dir = certs_dir / SITES_DIR / name
        return cls(
            name=name,
            dir=site_dir,
            private_key=site_dir / name,
            public_key=site_dir / f"{name}.pub",
            ca_crt=site_dir / CA_CRT,
            site_yaml=site_dir / SITE_YAML,
            bundle_json=site_dir / BUNDLE_JSON,
            coordinator_address=coordinator_address,
            fingerprint=fingerprint,
        )

    @property
    def files(self) -> list[Path]:
        """Every file the bundle writes."""
        return [self.private_key, self.public_key, self.ca_crt, self.site_yaml, self.bundle_json]
