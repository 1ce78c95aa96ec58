"""Flower plumbing: launch a federation in simulation or as real processes, exchange
messages, and keep the coordinator's inbox to an allow-list. No ML in here.

- `run_simulation_app`: Simulation Engine (Ray) in-process, per-node configs, run config.
- `RunConfig`: the app's run config, typed; defaults once, validated once (`RunConfigError`).
- `LocalDeployment`: SuperLink + SuperNodes + ``flwr run`` on 127.0.0.1 (TLS, node auth);
  its processes are :mod:`jacfusion_fed.processes`, its ``flwr`` CLI is `FlwrCli`.
- `wait_for_nodes`, `send_and_collect`: ServerApp-side messaging.
- `check_reply_allowed` with `RecordSpec` / `ArraySpec` / `ValueSpec`: reply allow-list.
- `write_run_results` / `read_run_results`: ServerApp -> caller, through ``run-dir``.

Importing this package sets Flower/Ray's offline, loopback-only environment variables
(see ``_env``) before ``flwr`` or ``ray`` are imported through it.
"""

from ._env import OFFLINE_ENV, apply_offline_defaults

apply_offline_defaults()

# The processes and TLS files a deployment is made of, from the layers below (package API).
from jacfusion_fed.processes import ManagedProcess, free_port  # noqa: E402
from jacfusion_fed.rpc.tls import TlsFiles  # noqa: E402

from .allowlist import (  # noqa: E402
    ArraySpec,
    RecordSpec,
    ReplyNotAllowedError,
    ValueSpec,
    check_reply_allowed,
)
from .config import format_config_arg, load_app_run_config, validate_config  # noqa: E402
from .deployment import LocalDeployment, NodeKeys, SuperNodeHandle  # noqa: E402
from .flwr_cli import (  # noqa: E402
    CONNECTION_NAME,
    DeploymentError,
    FlwrCli,
    FlwrCliError,
    RunFailedError,
    RunInfo,
)
from .messaging import (  # noqa: E402
    NO_REPLY_CODE,
    NOT_ALLOWED_CODE,
    NodeReplyError,
    ReplyError,
    error_code_name,
    send_and_collect,
    wait_for_nodes,
)
from .results import (  # noqa: E402
    RESULTS_FILE,
    RUN_DIR_KEY,
    read_run_results,
    run_dir_from_context,
    write_run_results,
)
from .run_config import RunConfig, RunConfigError  # noqa: E402
from .simulation import (  # noqa: E402
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
