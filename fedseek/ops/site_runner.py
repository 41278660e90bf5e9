"""How a site daemon runs Flower's SuperNode fast: a shorter idle poll and warm (forked) ClientApp processes.

Flower 1.41's SuperNode sleeps a hard-coded 3 s whenever it finds no message, and its SuperExec
starts a fresh `flwr-clientapp` interpreter for every message, which imports torch, Opacus and
fedseek again (4-10 s on a 2-core machine, measured in benchmarks/deploy_latency.py). Both are in
the way of every round. fedseek keeps Flower's processes and protocol and changes two things:

* `supernode`: runs Flower's own `flower-supernode` entry point with the idle poll shortened to
  `poll_interval_s` (and its 0.5 s reply waits to 0.05 s);
* `superexec`: Flower's own SuperExec loop whose ClientApp launcher forks a worker from a process
  that has already imported torch, Opacus and fedseek. Each message still runs in its own process
  (what Flower's subprocess isolation promises), but starts in milliseconds. The SuperNode finds it
  under the name `flower-superexec` on the PATH the site daemon gives it (a shim in state_dir/bin).

`python -m fedseek.ops.site_runner supernode --poll-s 0.5 -- <flower-supernode arguments>`
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import time as _time
from pathlib import Path
from typing import Any

log = logging.getLogger("fedseek.ops.site_runner")
PRELOAD = ("torch", "opacus", "numpy", "sklearn", "flwr_datasets", "flwr.supernode.runtime.run_clientapp", "fedseek.runtime.site",
           "fedseek.runtime.site_eval", "fedseek.privacy", "fedseek.train", "fedseek.data")


def _warm_up() -> None:
    """Trigger torch's lazy imports (an optimizer's first step imports torch._dynamo, ~0.8 s) on 1-element tensors.

    Tensors this small never enter a parallel region, so no OpenMP or intra-op threads exist when
    the workers are forked (a forked child cannot use a parent's thread pool).
    """
    import threading

    import torch

    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    (w * 2.0).sum().backward()
    opt.step()
    if threading.active_count() > 1:
        log.warning("warm-up left %d threads in the SuperExec: forked workers only inherit the main one",
                    threading.active_count())


class _PollClock:
    """The `time` module as start_client_internal sees it: idle polls of `poll_s`, reply waits of at most 0.05 s."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s

    def sleep(self, seconds: float) -> None:
        _time.sleep(self.poll_s if seconds >= 1.0 else min(seconds, 0.05))

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def patch_supernode_poll(poll_s: float) -> bool:
    """Shorten the SuperNode's idle poll; False (and a warning) if this Flower has no such loop to patch."""
    import flwr.supernode.start_client_internal as sci

    if getattr(sci, "time", None) is not _time:
        log.warning("flwr.supernode.start_client_internal has no module-level time: the SuperNode keeps Flower's poll")
        return False
    sci.time = _PollClock(poll_s)  # type: ignore[assignment]
    return True


def run_supernode(argv: list[str]) -> None:
    """`supernode --poll-s S -- ARGS`: Flower's flower-supernode with ARGS and a shorter idle poll."""
    poll_s = 3.0
    if argv[:1] == ["--poll-s"]:
        poll_s, argv = float(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    from flwr.supernode.cli.flower_supernode import flower_supernode

    patch_supernode_poll(max(0.05, poll_s))
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _fork_executor() -> Any:
    """A SubprocessExecutor whose ClientApp launches fork this (pre-imported) process instead of exec'ing Python."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    class ForkExecutor(SubprocessExecutor):
        def __init__(self) -> None:
            self.children: set[int] = set()

        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            self.reconcile()
            pid = os.fork()
            if pid == 0:
                _run_clientapp_child(spec)  # never returns
            self.children.add(pid)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            for pid in list(self.children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self.children.discard(pid)

    return ForkExecutor()


def _run_clientapp_child(spec: Any) -> None:
    """In the forked worker: run one ClientApp task exactly as `flwr-clientapp --token ...` would, then exit."""
    code = 1
    t0 = _time.monotonic()
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        certificates = None
        if not spec.insecure and spec.root_certificates_path:
            certificates = Path(spec.root_certificates_path).read_bytes()
        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=certificates, parent_pid=spec.parent_pid,
                      runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the worker must never return into the SuperExec loop
        import traceback

        traceback.print_exc()
    finally:
        print(f"fedseek: ClientApp task {spec.task_id} ran {_time.monotonic() - t0:.2f}s in forked worker {os.getpid()} "
              f"(exit {code})", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_superexec(argv: list[str]) -> None:
    """`superexec ARGS`: Flower's flower-superexec with ARGS, pre-imported, forking one worker per ClientApp task."""
    import importlib

    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # a missing optional import only costs the worker that time
            log.warning("preload %s failed: %s", module, exc)
    _warm_up()
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    import flwr.supercore.superexec.run_superexec as rs
    from flwr.supercore.cli.flower_superexec import flower_superexec

    rs.get_executor = lambda *_a, **_k: _fork_executor()
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


def write_superexec_shim(bin_dir: Path) -> Path:
    """state_dir/bin/flower-superexec: the name the SuperNode starts, running the warm SuperExec with this Python."""
    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    shim = bin_dir / "flower-superexec"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedseek.ops.site_runner superexec "$@"\n')
    shim.chmod(stat.S_IRWXU)
    return shim


def main(argv: list[str] | None = None) -> None:
    """Entry: `supernode ...` or `superexec ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args[:1] == ["supernode"]:
        run_supernode(args[1:])
    elif args[:1] == ["superexec"]:
        run_superexec(args[1:])
    else:
        print("usage: python -m fedseek.ops.site_runner {supernode --poll-s S -- ARGS | superexec ARGS}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
