"""The Fleet RPCs a site may call and how one HTTP exchange maps onto one gRPC call.

Each Fleet RPC `POST /v1/fleet/<rpc>` becomes the unary gRPC method `/fedseek.transport.v1.Fleet/<rpc>`
carrying the request body as raw bytes (no protobuf code generation: Flower's own messages pass
unchanged). Request headers that matter to the SuperLink (`content-type`, `accept`, every `flwr-*`)
travel as call metadata; the SuperLink's status code and response headers come back as trailing
metadata, so 401/403 reach the SuperNode exactly (Flower steers on them).
"""

from __future__ import annotations

from collections.abc import Iterable

SERVICE = "fedseek.transport.v1.Fleet"
#: Fleet RPCs of Flower 1.41 (flwr/superlink/routers/fleet): the only methods the endpoint has.
FLEET_RPCS: frozenset[str] = frozenset({
    "activate-node", "confirm-message-received", "deactivate-node", "get-fab", "get-run", "pull-messages",
    "pull-object", "push-messages", "push-object", "register-node", "send-node-heartbeat", "unregister-node",
})
FLEET_PREFIX = "/v1/fleet/"
STATUS_KEY = "fedseek-http-status"
_REQUEST_HEADERS = ("content-type", "accept")
_RESPONSE_HEADERS = ("content-type",)
#: gRPC reserves these names for itself: they cross under another name.
_RENAMED = {"content-type": "fedseek-content-type", "accept": "fedseek-accept"}
_RESTORED = {v: k for k, v in _RENAMED.items()}
#: Transport faults seen by the SuperNode: only these are retried by Flower, and 401/403 mean something else.
OUTAGE_STATUS = 503
DEADLINE_STATUS = 504


def method_path(rpc: str) -> str:
    """The gRPC method path of a Fleet RPC."""
    return f"/{SERVICE}/{rpc}"


def rpc_of_path(path: str) -> str | None:
    """The Fleet RPC named by an HTTP path (`/v1/fleet/pull-messages`), or None for anything else."""
    if not path.startswith(FLEET_PREFIX):
        return None
    rpc = path[len(FLEET_PREFIX):]
    return rpc if rpc in FLEET_RPCS else None


def _crosses(name: str, plain: tuple[str, ...]) -> bool:
    return (name in plain or name.startswith("flwr-")) and not name.endswith("-bin")


def _valid_value(value: str) -> bool:
    """gRPC metadata values (non -bin) are printable ASCII; anything else (CR, LF, NUL, non-ASCII) is not carried."""
    return value.isascii() and all(32 <= ord(c) < 127 for c in value)


def _to_metadata(headers: Iterable[tuple[str, str]], plain: tuple[str, ...], *, strict: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in headers:
        n = name.lower()
        if not _crosses(n, plain):
            continue
        if not _valid_value(value):
            if strict:
                raise ValueError(f"header {n} has characters that cannot cross the tunnel")
            continue
        out.append((_RENAMED.get(n, n), value))
    return out


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str]]:
    """HTTP headers back from tunnel metadata (the reserved names restored; gRPC's own keys dropped)."""
    out: list[tuple[str, str]] = []
    for k, v in metadata or ():
        name = _RESTORED.get(k, k)
        if isinstance(v, str) and (name in _REQUEST_HEADERS or name.startswith("flwr-")) and not name.endswith("-bin"):
            out.append((name, v))
    return out


def request_metadata(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request headers that cross the tunnel as gRPC metadata; ValueError on a value gRPC cannot carry."""
    return _to_metadata(headers, _REQUEST_HEADERS, strict=True)


def response_metadata(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The SuperLink's response headers that cross back (content-type and flwr-*) as gRPC metadata."""
    return _to_metadata(headers, _RESPONSE_HEADERS, strict=False)


def metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    """The first value of `key` in gRPC metadata (None if absent)."""
    for k, v in metadata or ():
        if k == key:
            return v.decode("ascii", "replace") if isinstance(v, bytes) else v
    return None
