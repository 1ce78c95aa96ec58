"""Flower plumbing: launch a federation in simulation or as real processes, exchange
messages, and keep the coordinator's inbox to an allow-list. No ML in here.

- `run_simulation_app`: Simulation Engine (Ray) in-process, per-node configs, run config.
- `RunConfig`: the app's run config, typed; defaults once, validated once (`RunConfigError`).
- `LocalDeployment`: SuperLink + SuperNodes + ``flwr run`` on 127.0.0.1 (TLS, node auth);
  its processes are :mod:`jacfusion_fed.processes`, its ``flwr`` CLI is `FlwrCli`.
- `wait_for_nodes`, `send_and_collect`: ServerApp-side messaging.
- `check_reply_allowed` with `RecordSpec` / `ArraySpec` / `ValueSpec`: reply allow-list.
- `write_run_results` / `read_run_results`: ServerApp -> caller, through ``run-dir``.

Importing this package changes nothing in the environment: Flower/Ray's offline,
loopback-only environment variables (see ``_env``) are set where a simulation starts Ray
(`run_simulation_app`) and where a deployment starts its processes (`LocalDeployment`, whose
children get them through ``child_env``), with the copies in already imported ``flwr``/``ray``
modules patched there too.
"""

# The processes and TLS files a deployment is made of, from the layers below (package API).
from jacfusion_fed.processes import ManagedProcess, free_port
from jacfusion_fed.rpc.tls import TlsFiles

from ._env import OFFLINE_ENV, apply_offline_defaults
from .allowlist import (
    ArraySpec,
    RecordSpec,
    ReplyNotAllowedError,
    ValueSpec,
    check_reply_allowed,
)
from .config import format_config_arg, load_app_run_config, validate_config
from .deployment import LocalDeployment, NodeKeys, SuperNodeHandle
from .flwr_cli import (
    CONNECTION_NAME,
    DeploymentError,
    FlwrCli,
    FlwrCliError,
    RunFailedError,
    RunInfo,
)
from .messaging import (
    NO_REPLY_CODE,
    NOT_ALLOWED_CODE,
    NodeReplyError,
    ReplyError,
    error_code_name,
    send_and_collect,
    wait_for_nodes,
)
from .results import (
    RESULTS_FILE,
    RUN_DIR_KEY,
    read_run_results,
    run_dir_from_context,
    write_run_results,
)
from .run_config import RunConfig, RunConfigError
from .simulation import (
    SimulatedNodeClientApp,
    SimulationResult,
    WithRunConfigServerApp,
    run_simulation_app,
)

__all__ = [
    "CONNECTION_NAME",
    "NOT_ALLOWED_CODE",
    "NO_REPLY_CODE",
    "OFFLINE_ENV",
    "RESULTS_FILE",
    "RUN_DIR_KEY",
    "ArraySpec",
    "DeploymentError",
    "FlwrCli",
    "FlwrCliError",
    "LocalDeployment",
    "ManagedProcess",
    "NodeKeys",
    "NodeReplyError",
    "RecordSpec",
    "ReplyError",
    "ReplyNotAllowedError",
    "RunConfig",
    "RunConfigError",
    "RunFailedError",
    "RunInfo",
    "SimulatedNodeClientApp",
    "SimulationResult",
    "SuperNodeHandle",
    "TlsFiles",
    "ValueSpec",
    "WithRunConfigServerApp",
    "apply_offline_defaults",
    "check_reply_allowed",
    "error_code_name",
    "format_config_arg",
    "free_port",
    "load_app_run_config",
    "read_run_results",
    "run_dir_from_context",
    "run_simulation_app",
    "send_and_collect",
    "validate_config",
    "wait_for_nodes",
    "write_run_results",
]
