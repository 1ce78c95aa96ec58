"""The options every ``jacfusion-fed`` command shares, and the one meaning of each name.

Glossary (an option name means the same thing in every command that has it):

- ``--out PATH``: where the command writes its results: a folder (``simulate``, ``evaluate``,
  ``certs``) or a file (``bench ...``, ``deploy key``, ``deploy labels``). Never read.
- ``--workdir DIR``: keep the intermediate files of a run here (default: a temporary folder
  that is deleted at the end).
- ``--workspace DIR``: an owner's persistent state (model store, logit cache, live records),
  read and written across runs. ``--registry DIR|FILE.sqlite3|postgresql://...``: the
  coordinator's head registry, the same idea (a directory holds ``registry.sqlite3``; replicas
  on several hosts share a PostgreSQL database).
- ``--batch N``: how many items one request carries (``submit``: records per ``PutRecords``;
  ``bench``: ids per request).
- ``--data SOURCE``: a data source, ``builtin:NAME[?seed=..&quick=1&site=..&sites=..]`` or
  ``npz:FILE`` (an owner's own records; ``owner serve`` without it answers only for records
  requesters ``submit``, kept ``--retention SECONDS``, default until forgotten).
- ``--method NAME``: the fusion method, one of :data:`FUSION_METHODS`, spelled as in the tables
  and the JSON output. (``simulate --training`` names the owners' training add-on.)
- ``--gamma VALUE``: gamma of the Jacobian fusion in (0, 1] for every modality, or ``auto``
  where the command can choose it on validation data (``simulate``, ``evaluate``).
  ``--modality-gamma MODALITY=VALUE`` overrides it for one modality (``predict``);
  ``--gamma-grid V,V,...`` lists the candidates ``auto`` chooses from (``evaluate``).
- ``--coordinator HOST[:PORT]``: the coordinator's address (no hidden default host; the port
  defaults to :data:`DEFAULT_COORDINATOR_PORT`), or several replicas comma-separated;
  ``coordinator serve --port`` binds :data:`DEFAULT_COORDINATOR_PORT` unless told otherwise.
- ``--host ADDRESS``: the address a server binds (loopback by default; ``0.0.0.0`` for every
  interface, with a one-line warning whenever it is not loopback).
- ``--port N``: the port a server binds (0: any free port; see ``--port-file``); one default
  per service: :data:`DEFAULT_COORDINATOR_PORT` (coordinator), :data:`DEFAULT_OWNER_PORT`
  (owner).
- ``--timeout SECONDS``: the deadline of every call the command makes; ``--owner-timeout
  SECONDS``: how long the coordinator waits for each owner.
- ``--tls DIR`` (``ca.pem``, ``cert.pem``, ``key.pem``) or, on loopback only, ``--insecure``.
- ``--json``: JSON on stdout instead of tables, with the same names (methods, labels, model
  versions) the tables show.
- ``--log-level LEVEL``: ``debug``, ``info``, ``warning`` or ``error`` (every command).
  ``debug`` also shows tracebacks, gRPC core logs and Flower's logs.

- ``--metrics-port N``: serve Prometheus metrics (``GET /metrics``) on this loopback port
  (``owner serve``, ``coordinator serve``; 0: any free port; default: none).
  ``--max-streams-per-peer N``: streaming calls one peer may hold at once (default: a quarter
  of ``--max-workers``); more are answered ``RESOURCE_EXHAUSTED``.
- ``--audit-log PATH``: append a hash-chained, signed record of every call that touches
  patient data or a model to this file (``owner serve``, ``coordinator serve``, ``owner
  import-model``, ``owner rekey``, ``simulate``, ``deploy local``); ``--audit-rotate SPEC``:
  begin a new file at a size or age (``64MiB``, ``1d``, both: ``64MiB,1d``; ``none``). Read
  with ``audit verify`` / ``audit show``. ``--audit-fsync entry|checkpoint``: sync every
  entry to disk before the response (survives a power loss; the default) or only at
  checkpoints (survives a crash of the service only; see docs/audit.md for what each costs).
- ``--secagg``: FedAvg rounds of a modality held by several sites with Flower's SecAgg+
  (the coordinator sees only the sum of the sites' updates); ``--dp-clip C --dp-noise SIGMA``:
  central differential privacy on those rounds (each site's update clipped to L2 norm C,
  Gaussian noise of standard deviation SIGMA * C / sites added to the average)
  (``simulate``, ``deploy local``).
- ``--trace-file PATH``: append this process's OpenTelemetry spans to PATH as OTLP JSON lines
  (``owner serve``, ``coordinator serve``, ``predict``); the ``OTEL_*`` environment variables
  (``OTEL_EXPORTER_OTLP_ENDPOINT``, ...) send them to an OTLP collector as well
  (:mod:`jacfusion_fed.rpc.tracing`). Without either, nothing is traced.
- ``certs --coordinator-name NAME[@HOST,...]`` names the coordinator's certificate (not an
  address, hence not ``--coordinator``).

Model versions are shown everywhere as the store's 16-hex-digit id, never prefixed or cut
(version columns do not wrap). A renamed option keeps working for one release:
:func:`deprecated` prints a one-line notice on stderr and returns the value.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer

from jacfusion_fed.cli.errors import CliError

__all__ = [
    "DEFAULT_COORDINATOR_PORT",
    "DEFAULT_OWNER_PORT",
    "FUSION_METHODS",
    "LOG_LEVELS",
    "AuditFsyncOpt",
    "AuditLogOpt",
    "AuditRotateOpt",
    "CoordinatorOpt",
    "DpClipOpt",
    "DpNoiseOpt",
    "HostOpt",
    "InsecureOpt",
    "JsonOpt",
    "MaxStreamsPerPeerOpt",
    "MetricsPortOpt",
    "PortFileOpt",
    "SecAggOpt",
    "TimeoutOpt",
    "TlsOpt",
    "TraceFileOpt",
    "check_choice",
    "deprecated",
    "parse_gamma",
    "parse_gamma_or_auto",
    "private_fedavg",
]

#: The one default port of the coordinator (``coordinator serve``, ``predict``,
#: ``coordinator info``, the README).
DEFAULT_COORDINATOR_PORT: Final = 50060
#: The one default port of an owner's ModalityService (``owner serve``, the README's
#: multi-host walkthrough); several owners on one machine each pass their own ``--port``.
DEFAULT_OWNER_PORT: Final = 50051

#: Fusion methods by the names every table, JSON output and option uses.
FUSION_METHODS: Final = ("statistical", "jacobian", "mean", "confidence_mean", "robust")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

T = TypeVar("T")

TlsOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls", help="Certificate directory (ca.pem, cert.pem, key.pem).", show_default=False
    ),
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Plain text on loopback, no authentication.")
]
HostOpt = Annotated[
    str,
    typer.Option(help="Address to bind: an IP, a host name, or 0.0.0.0 for every interface."),
]
PortFileOpt = Annotated[
    Path | None, typer.Option(help="Write the bound port to this file once serving.")
]
CoordinatorOpt = Annotated[
    str,
    typer.Option(
        "--coordinator",
        help=f"HOST[:PORT] of the coordinator (port {DEFAULT_COORDINATOR_PORT} if omitted), or "
        "its replicas comma-separated (IP addresses; gRPC balances over them and retries a call "
        "a replica could not answer).",
        show_default=False,
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        help="Serve Prometheus metrics (GET /metrics) on this loopback port (0: any free port).",
        min=0,
        show_default=False,
    ),
]
MaxStreamsPerPeerOpt = Annotated[
    int | None,
    typer.Option(
        help="Streaming calls one peer may hold at once (default: a quarter of --max-workers).",
        min=1,
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (same names as the tables) instead of tables.")
]
TimeoutOpt = Annotated[float, typer.Option(help="Deadline of every call (s).", min=0.001)]
AuditLogOpt = Annotated[
    Path | None,
    typer.Option(
        help="Append a tamper-evident record of every call touching patient data or models "
        "to this file (see `jacfusion-fed audit`).",
        show_default=False,
    ),
]
AuditFsyncOpt = Annotated[
    str,
    typer.Option(help="Sync audit entries to disk: entry (before each response) or checkpoint."),
]
SecAggOpt = Annotated[
    bool,
    typer.Option("--secagg", help="FedAvg rounds with Flower's SecAgg+ (several sites each)."),
]
DpClipOpt = Annotated[
    float,
    typer.Option(
        help="Central DP: clip each site's FedAvg update to this L2 norm (0: off).", min=0
    ),
]
DpNoiseOpt = Annotated[
    float,
    typer.Option(help="Central DP: noise multiplier sigma (std sigma * clip / sites).", min=0),
]
TraceFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="Append this process's OpenTelemetry spans to this file as OTLP JSON lines "
        "(OTEL_* variables configure an OTLP exporter as well).",
        show_default=False,
    ),
]
AuditRotateOpt = Annotated[
    str,
    typer.Option(help="Begin a new audit file at this size or age: 64MiB, 1d, 64MiB,1d, none."),
]


def deprecated(old: str, new: str, value: T | None, current: T) -> T:
    """``value`` (given under the old name ``old``) with a one-line notice, else ``current``.

    Renamed options keep their old name for one release so existing scripts keep working.
    """
    if value is None or value is False or value == []:
        return current
    print(f"warning: {old} is deprecated and will be removed; use {new}", file=sys.stderr)
    return value


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`CliError` naming them."""
    if value not in choices:
        raise CliError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_gamma(text: str, *, option: str = "--gamma") -> float:
    """A gamma in (0, 1]; :class:`CliError` naming ``option`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # also false for nan
        raise CliError(f"{option} must be a value in (0, 1], got {text!r}")
    return value


def parse_gamma_or_auto(text: str, *, option: str = "--gamma") -> float | None:
    """``None`` for ``auto`` (chosen on validation data), else :func:`parse_gamma`."""
    if text == "auto":
        return None
    try:
        return parse_gamma(text, option=option)
    except CliError:
        raise CliError(f"{option} must be 'auto' or a value in (0, 1], got {text!r}") from None


def private_fedavg(
    secagg: bool, dp_clip: float, dp_noise: float, sites: int, audit_log: Path | None
) -> dict[str, Any]:
    """Run config values of ``--secagg``, ``--dp-clip``, ``--dp-noise`` and ``--audit-log``
    (``simulate``, ``deploy local``); :class:`CliError` when they cannot apply."""
    if (secagg or dp_clip or dp_noise) and sites < 2:
        raise CliError(
            "--secagg and --dp-clip/--dp-noise protect FedAvg rounds: pass "
            "--sites-per-modality 2 or more"
        )
    if dp_noise and not dp_clip:
        raise CliError("--dp-noise needs --dp-clip (the noise is scaled by the clipping norm)")
    out: dict[str, Any] = {"secagg": secagg, "dp_clip": dp_clip, "dp_noise": dp_noise}
    if audit_log is not None:
        out["audit_log"] = str(audit_log.expanduser().resolve())
    return out
