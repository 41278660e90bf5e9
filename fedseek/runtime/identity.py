"""Which site a node is, and how long a silent site is left out: the coordinator's side of site identity.

Deployment with registered sites (`sites:` in the coordinator config): a node's site is the one
whose registered public key Flower authenticated for that node id. `grid.get_nodes()` lists each
node with the public key its SuperNode signs its Fleet requests with (`--enable-supernode-auth`
maps that key to the node id), so no question is asked and no name written in a reply counts.
Simulation (no registered keys: the engine's nodes have random keys): a node says once which
partition site it is (QUERY), and that answer is its identity for the rest of the run.

Either way a reply of any kind (update, refusal, evaluation, QUERY answer) that names another
site than its sender's identity is rejected and audited as `impersonation`; the named site is
not touched (no exclusion, no blame, no privacy entry).

A site that sends nothing within the round's time-out is left out of the next rounds with
exponential back-off (1, 2, 4, ... rounds, capped), then asked again; any answer resets it.
"""

from __future__ import annotations

from typing import Any

from fedseek.wire.identity import fingerprint, pem_spki

BACKOFF_CAP_ROUNDS = 8  # the longest a silent site is left out before it is asked again


class SiteKeys:
    """The registered sites' public keys (DER SPKI): the site a node is, from the key Flower authenticated it with."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        """`keys`: site name -> DER SubjectPublicKeyInfo (fedseek.wire.identity.read_site_keys)."""
        self.by_key = {der: name for name, der in keys.items()}

    def site_of(self, public_key: bytes) -> str | None:
        """The registered site with this (PEM) public key, None for any other key."""
        der = pem_spki(public_key) if public_key else b""
        return self.by_key.get(der) if der else None

    @staticmethod
    def fingerprint(public_key: bytes) -> str:
        """A loggable fingerprint of a node's (PEM) key ("none" when it carries none)."""
        der = pem_spki(public_key) if public_key else b""
        return fingerprint(der) if der else "none"


def claim_problem(claimed: str, identity: str | None, owner: int | None, node: int) -> str:
    """Why a reply from `node` (identity `identity`) may not name site `claimed` ("" when it may).

    `owner` is the node currently holding the name `claimed` (None: nobody). A reply naming no
    site, or its sender's own site, is fine; so is a not yet identified node naming a free site.
    """
    if not claimed or claimed == identity:
        return ""
    if identity is not None:
        return f"reply names site {claimed!r} but comes from site {identity!r} (node {node})"
    if owner is not None and owner != node:
        return f"reply names site {claimed!r}, which is node {owner}, but comes from node {node}"
    return ""


class Backoff:
    """Consecutive time-outs per site and the round each silent site is asked again (checkpointed)."""

    def __init__(self, cap_rounds: int = BACKOFF_CAP_ROUNDS) -> None:
        """Skips double with each consecutive time-out: 1, 2, 4, ... rounds, at most `cap_rounds`."""
        self.cap_rounds = cap_rounds
        self.misses: dict[str, int] = {}  # site -> consecutive time-outs
        self.retry: dict[str, int] = {}  # site -> first round it is asked again

    def skipping(self, site: str, rnd: int) -> bool:
        """Whether `site` is left out of round `rnd`."""
        return self.retry.get(site, 0) > rnd

    def missed(self, site: str, rnd: int) -> tuple[int, int]:
        """`site` sent nothing in round `rnd`: (its consecutive time-outs, rounds it now skips)."""
        k = self.misses[site] = self.misses.get(site, 0) + 1
        skip = min(2 ** (k - 1), self.cap_rounds)
        self.retry[site] = rnd + 1 + skip
        return k, skip

    def answered(self, site: str) -> None:
        """`site` answered (anything, even an error): it is asked as usual again."""
        self.misses.pop(site, None)
        self.retry.pop(site, None)

    def state_dict(self) -> dict[str, Any]:
        """Consecutive time-outs and retry rounds per site (plain data)."""
        return {"misses": dict(self.misses), "retry": dict(self.retry)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict saved."""
        self.misses = {str(k): int(v) for k, v in state.get("misses", {}).items()}
        self.retry = {str(k): int(v) for k, v in state.get("retry", {}).items()}
