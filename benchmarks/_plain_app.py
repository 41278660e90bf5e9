"""The minimal plain-Flower app benchmarks/platform_overhead.py measures fedseek against (written into a temp dir).

A Flower App (pyproject [tool.flwr.app]) whose ClientApp trains fedseek's model with fedseek's
training loop on fedseek's partition of a built-in dataset, and whose ServerApp runs Flower's
FedAvg.start with the same central evaluation each round: the same work as `fedseek simulate`,
without fedseek's platform layer.
"""

from __future__ import annotations

from pathlib import Path

PLAIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "plainbench"
version = "1.0.0"
description = "Minimal plain-Flower baseline for benchmarks/platform_overhead.py"
license = {text = "Apache-2.0"}
dependencies = ["flwr[simulation]>=1.41.0"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "plainbench.server_app:app"
clientapp = "plainbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
num-sites = 10
dataset = "breast_cancer"
data-options = ""
test-fraction = 0.25
scheme = "iid"
alpha = 1.0
seed = 0
kind = "mlp"
hidden = "[64]"
momentum = 0.0
local-epochs = 1
lr = 0.05
batch-size = 16
out-dir = ""
"""

PLAIN_TASK = '''\
"""Data and model shared by the plain ClientApp and ServerApp: fedseek's, unchanged."""

import functools
import json

from fedseek.data import load_builtin, partition_indices


def _options(text):
    """'num_banks:100,rows_per_bank:200' -> {'num_banks': 100, 'rows_per_bank': 200}."""
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split(":", 1)
        out[k] = json.loads(v)
    return out


@functools.lru_cache(maxsize=2)
def splits(dataset, options, seed, test_fraction):
    return load_builtin(dataset, seed, test_fraction=test_fraction, **_options(options))


@functools.lru_cache(maxsize=2)
def partitions(dataset, options, seed, test_fraction, num_sites, scheme, alpha):
    train, _ = splits(dataset, options, seed, test_fraction)
    return partition_indices(train.y, num_sites, scheme, alpha=alpha, seed=seed, min_partition_size=2,
                             groups=getattr(train, "groups", None))


def key(rc):
    return (str(rc["dataset"]), str(rc["data-options"]), int(rc["seed"]), float(rc["test-fraction"]))
'''

PLAIN_CLIENT = '''\
"""Minimal plain-Flower ClientApp: train fedseek's MLP on this node's partition, return the weights."""

import json

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedseek.train.models import build_model
from fedseek.train.local import train_local
from plainbench.task import key, partitions, splits

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    rc = context.run_config
    pid = int(context.node_config["partition-id"])
    train_set, _ = splits(*key(rc))
    idx = partitions(*key(rc), int(rc["num-sites"]), str(rc["scheme"]), float(rc["alpha"]))[pid]
    x, y = train_set.x[idx], train_set.y[idx]
    model = build_model(str(rc["kind"]), train_set.input_shape, int(train_set.num_classes), json.loads(str(rc["hidden"])))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rnd = int(msg.content["config"]["server-round"])
    res = train_local(model, x, y, num_classes=int(train_set.num_classes), epochs=int(rc["local-epochs"]), lr=float(rc["lr"]),
                      batch_size=int(rc["batch-size"]), momentum=float(rc["momentum"]), seed=int(rc["seed"]) * 100003 + rnd * 1009 + pid)
    metrics = MetricRecord({"train-loss": float(res.loss), "num-examples": int(res.num_examples)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
'''

PLAIN_SERVER = '''\
"""Minimal plain-Flower ServerApp: FedAvg.start with central evaluation each round, round-end stamps to a file."""

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedseek.train.models import build_model
from fedseek.train.local import evaluate
from plainbench.task import key, splits

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n = int(rc["num-sites"])
    _, test = splits(*key(rc))
    hidden = json.loads(str(rc["hidden"]))
    out = Path(str(rc["out-dir"])) / "plain_rounds.jsonl"
    deadline = time.monotonic() + 600
    while len(list(grid.get_node_ids())) < n and time.monotonic() < deadline:  # Flower samples too few otherwise
        time.sleep(0.5)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_model(str(rc["kind"]), test.input_shape, int(test.num_classes), hidden)
        model.load_state_dict(arrays.to_torch_state_dict())
        m = evaluate(model, test.x, test.y, int(test.num_classes))
        with open(out, "a") as fh:
            fh.write(json.dumps({"round": server_round, "time": time.time(), **m}) + "\\n")
        return MetricRecord({k: float(v) for k, v in m.items()})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model(str(rc["kind"]), test.input_shape, int(test.num_classes), hidden,
                                                                       seed=int(rc["seed"])).state_dict()),
                   num_rounds=int(rc["num-server-rounds"]), train_config=ConfigRecord({"lr": float(rc["lr"])}), evaluate_fn=central)
'''


def write_plain_app(root: Path) -> Path:
    """The plain Flower App's files under `root`."""
    (root / "plainbench").mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(PLAIN_PYPROJECT)
    (root / "plainbench" / "__init__.py").write_text("")
    (root / "plainbench" / "task.py").write_text(PLAIN_TASK)
    (root / "plainbench" / "client_app.py").write_text(PLAIN_CLIENT)
    (root / "plainbench" / "server_app.py").write_text(PLAIN_SERVER)
    return root
