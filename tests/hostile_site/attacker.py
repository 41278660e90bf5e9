"""Test-only: the hostile train handler a modified site runs (see sitecustomize.py in this folder)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

import fedseek.runtime.site as site_module
from fedseek.wire.records import CONFIG, RefusalMetrics, RoundConfig, refusal_content
from tests.hostile_replies import names_site, nested_json, num_examples, scaled, wrong_shapes

VICTIM = "site-a"  # the honest site the impersonation modes name

MUTATORS: dict[str, Callable[[RecordDict], None]] = {
    "nested_json": nested_json,
    "inf_examples": num_examples(math.inf),
    "nan_examples": num_examples(math.nan),
    "negative_examples": num_examples(-100),
    "huge_examples": num_examples(1e12),
    "values_1e30": scaled(1e30, absolute=True),
    "sign_flip_x10": scaled(-10.0),
    "wrong_shapes": wrong_shapes,
    "reply_as_victim": names_site(VICTIM),
}


def _mode(server_round: int) -> str:
    """This round's mode from the schedule file ("" = behave honestly)."""
    schedule = json.loads(Path(os.environ["FEDSEEK_HOSTILE_SCHEDULE"]).read_text() or "{}")
    return str(schedule.get(str(server_round), ""))


def install() -> None:
    """Wrap fedseek's train handler (before clients.app binds it) with the scheduled attacks."""
    honest = site_module.handle_train

    def hostile_train(msg: Message, context: Context) -> Message:
        mode = _mode(RoundConfig.from_record(msg.content.config_records[CONFIG]).server_round)
        if mode == "silent":  # answer only after the coordinator's round time-out
            time.sleep(float(os.environ.get("FEDSEEK_HOSTILE_SILENCE_S", "60")))
        if mode == "refusal_as_victim":
            return Message(content=refusal_content("privacy budget spent", RefusalMetrics(num_examples=100), VICTIM), reply_to=msg)
        reply = honest(msg, context)
        if mode in MUTATORS:
            MUTATORS[mode](reply.content)
        return reply

    site_module.handle_train = hostile_train
