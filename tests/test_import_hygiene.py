"""Imports have no side effects: importing the federation package changes no environment
variable (they are set where Ray and Flower start), and the requester's old package name still
imports, with a DeprecationWarning, for one release."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings


def test_importing_federation_changes_no_environment_variable() -> None:
    code = (
        "import os; before = dict(os.environ); "
        "import jacfusion_fed.federation, jacfusion_fed.federation.simulation; "
        "import jacfusion_fed.federation.deployment; "
        "after = dict(os.environ); "
        "changed = (k for k in before.keys() | after.keys() if before.get(k) != after.get(k)); "
        # Ours are Flower's and Ray's (OFFLINE_ENV); torch and grpc set a few of their own.
        "print(sorted(k for k in changed if k.startswith(('FLWR_', 'RAY_'))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_offline_environment_is_set_where_flower_and_ray_start() -> None:
    from jacfusion_fed.federation._env import OFFLINE_ENV, child_env

    env = child_env()
    assert all(env[k] == v for k, v in OFFLINE_ENV.items())


def test_old_requester_package_still_imports_with_a_deprecation_warning() -> None:
    sys.modules.pop("jacfusion_fed.client", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import jacfusion_fed.client as old
    from jacfusion_fed.answer import FusedAnswer
    from jacfusion_fed.requester import Requester

    assert old.Requester is Requester and old.Prediction is FusedAnswer
    assert any(
        issubclass(w.category, DeprecationWarning) and "jacfusion_fed.requester" in str(w.message)
        for w in caught
    )
