"""Test-only: turns a real fedseek site into a hostile one, inside its Flower ClientApp process.

tests/test_deploy_hostile.py starts one site daemon with this directory on PYTHONPATH and
FEDSEEK_HOSTILE_SCHEDULE naming a JSON file {round: mode}. Python imports `sitecustomize` at
start-up in every process of that daemon; when the ClientApp module (`clients.app`) is first
imported, the site's train handler is wrapped so that, in the scheduled rounds, its real reply is
replaced by a hostile one (tests/hostile_site/attacker.py). Nothing of this is part of fedseek.
"""

import os
import sys
from pathlib import Path


class _WrapClientApp:
    """A meta-path finder that patches the train handler just before `clients.app` is imported."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if name == "clients.app":
            sys.meta_path.remove(self)
            sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repository (for tests.*)
            from tests.hostile_site.attacker import install

            install()
        return None


if os.environ.get("FEDSEEK_HOSTILE_SCHEDULE"):
    sys.meta_path.insert(0, _WrapClientApp())
