"""Simulated faults (simulation only): drop-outs and Byzantine sites, as a Flower ClientApp mod.

The production site handler never sees this code: the mod wraps the ClientApp and acts only
when the run is a scenario (`config-kind` scenario) whose `faults` section asks for it. A
Byzantine site's honest reply is decoded, attacked and re-encoded, exactly what a modified
site could send; the coordinator's screening must catch it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType

from fedseek.config import FaultSpec
from fedseek.runtime.site import model_for
from fedseek.runtime.site_runtime import scenario_config
from fedseek.wire.blob import pack_blob, unpack_blob
from fedseek.wire.codec import CodecSpec, decode, encode
from fedseek.wire.records import CONFIG, RoundConfig
from fedseek.wire.transfer import unpack_global

log = logging.getLogger("fedseek.faults")
Handler = Callable[[Message, Context], Message]


def byzantine_sites(num_sites: int, fraction: float, seed: int) -> set[int]:
    """Which simulated sites misbehave: a seeded choice, the same in every run with that seed."""
    k = int(round(fraction * num_sites))
    if k <= 0:
        return set()
    return {int(i) for i in np.random.default_rng([seed, 0xB12]).choice(num_sites, size=k, replace=False)}


def attack_for(faults: FaultSpec, num_sites: int, seed: int, index: int) -> str | None:
    """The attack simulated site `index` mounts, None for an honest site."""
    byz = faults.byzantine
    bad = sorted(byzantine_sites(num_sites, byz.fraction, seed)) if byz.fraction > 0 else []
    if index not in bad:
        return None
    attacks = byz.attack if isinstance(byz.attack, list) else [byz.attack]
    return str(attacks[bad.index(index) % len(attacks)])


def corrupt(delta: dict[str, np.ndarray], attack: str, scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A Byzantine version of an honest update delta."""
    if attack == "sign_flip":
        return {k: -scale * v for k, v in delta.items()}
    if attack == "scale":
        return {k: scale * v for k, v in delta.items()}
    if attack == "noise":
        return {k: v + rng.normal(0.0, scale, size=v.shape).astype(np.float32) for k, v in delta.items()}
    if attack == "wrong_shape":
        return {k: np.zeros(v.size + 1, dtype=np.float32) for k, v in delta.items()}
    return delta


def _reencode(msg: Message, reply: Message, cfg: RoundConfig, attack: str, scale: float, rng: np.random.Generator) -> None:
    """Replace the reply's update blob by the attacked one (NaN payloads bypass the encoder's finiteness check)."""
    arrays, meta = unpack_blob(reply.content.array_records["update"]["blob"].numpy())
    shapes = {k: tuple(v.shape) for k, v in model_for(cfg).state_dict().items()}
    _, mask = unpack_global(msg.content, shapes)
    delta = decode(arrays, meta, mask=mask, expected_shapes=shapes)
    if attack == "nan":
        enc = encode(delta, CodecSpec())
        enc.arrays = {k: np.full_like(v, np.nan) for k, v in enc.arrays.items()}
    else:
        bad = corrupt(delta, attack, scale, rng)
        spec = CodecSpec(**{**cfg.codec, "error_feedback": False})
        enc = encode(bad, spec if attack != "wrong_shape" else CodecSpec(), nonce=cfg.server_round)
    reply.content.array_records["update"] = ArrayRecord({"blob": Array(pack_blob(enc.arrays, enc.meta))})


SECURE_VALUES = "fitres.parameters"  # a distributed-DP reply's values, before SecAgg+ masks them


def _corrupt_secure(reply: Message, attack: str, scale: float, rng: np.random.Generator) -> None:
    """A Byzantine site inside secure aggregation: its values are attacked before masking (nothing checks them there)."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord

    arrays = parameters_to_ndarrays(arrayrecord_to_parameters(reply.content.array_records[SECURE_VALUES], keep_input=True))
    values = {str(i): a for i, a in enumerate(arrays)}
    if attack == "nan":
        bad = {k: np.full_like(v, np.nan) for k, v in values.items()}
    else:
        bad = corrupt(values, attack if attack != "wrong_shape" else "scale", scale, rng)
    params = ndarrays_to_parameters([np.asarray(bad[str(i)], dtype=np.float32) for i in range(len(arrays))])
    reply.content.array_records[SECURE_VALUES] = parameters_to_arrayrecord(params, keep_input=True)


def simulated_faults(msg: Message, context: Context, call_next: Handler) -> Message:
    """ClientApp mod: in a scenario with faults, drop out or corrupt TRAIN replies; otherwise a pass-through."""
    if msg.metadata.message_type != MessageType.TRAIN or str(context.run_config.get("config-kind", "scenario")) != "scenario" \
            or "partition-id" not in context.node_config:
        return call_next(msg, context)
    scenario = scenario_config(context)
    faults, index = scenario.faults, int(context.node_config["partition-id"])
    cfg = RoundConfig.from_record(msg.content.config_records[CONFIG])
    rnd = cfg.server_round
    rng = np.random.default_rng([scenario.seed, rnd, index, 0xD20])
    if faults.dropout_rate > 0 and rng.random() < faults.dropout_rate:
        raise RuntimeError(f"simulated drop-out of site-{index:03d} in round {rnd}")
    reply = call_next(msg, context)
    attack = attack_for(faults, scenario.num_sites, scenario.seed, index)
    if attack is not None and not reply.has_error() and SECURE_VALUES in reply.content.array_records:
        log.info("site-%03d is Byzantine (%s) in secure round %d", index, attack, rnd)
        _corrupt_secure(reply, attack, faults.byzantine.scale, rng)
        return reply
    if attack is None or reply.has_error() or "update" not in reply.content.array_records:
        return reply
    log.info("site-%03d is Byzantine (%s) in round %d", index, attack, rnd)
    _reencode(msg, reply, cfg, attack, faults.byzantine.scale, rng)
    return reply
