"""Private FedAvg within a modality: Flower's SecAgg+ and differential-privacy mods, wired into
the jacfusion app (the owners' side and the allow-lists; the coordinator's side is
:mod:`jacfusion_fed.server.federated_private`).

Only the FedAvg ``train`` rounds of a modality held by several sites are private; logits
queries need no secure aggregation (each owner's logits are what the coordinator fuses).

**SecAgg+** (``secagg = true``): the coordinator runs Flower's ``SecAggPlusWorkflow`` (legacy
strategy API, four message stages per round), each owner Flower's ``secaggplus_mod``. Both are
Flower's own code, unchanged; what Flower 1.42 does not provide is a bridge from its legacy
``FitIns``/``FitRes`` records (the only format ``SecAggPlusWorkflow`` sends and
``secaggplus_mod`` masks) to this app's ``train`` messages: :func:`fitins_adapter_mod`
translates a ``FitIns`` round into the app's round request and the reply back into a
``FitRes`` (parameters in ``param-names`` order), so the owner's handler is the same in every
mode. The coordinator receives only masked vectors (integers modulo 2^32), the owners' public
keys and encrypted key shares, and in the last stage the shares that remove the masks of the
*sum*; the allow-lists of the four stages are :func:`secagg_reply_spec`.

**Differential privacy** (``dp-clip = C``, ``dp-noise = sigma``): central DP with client-side
clipping, as Flower pairs it with SecAgg+: each owner clips its update (new - global) to L2
norm ``C`` with Flower's ``fixedclipping_mod``; the coordinator's
``DifferentialPrivacyClientSideFixedClipping`` wrapper adds Gaussian noise of standard
deviation ``sigma * C / n_sites`` to the aggregate. Without SecAgg this is the Message-API
wrapper and mod (``flwr.serverapp.strategy``, ``flwr.clientapp.mod``), with SecAgg their legacy
twins (``flwr.server.strategy``, ``flwr.client.mod``), which speak ``FitIns``/``FitRes``.

Every mod here is *gated*: it acts only on the messages it is meant for (:func:`train_mods`),
because one ``train`` handler also serves local training and publishing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .allowlist import ArraySpec, PackedArraysSpec, RecordSpec, ValueSpec
from .protocol import train_request

__all__ = [
    "FITINS_CONFIG",
    "FITINS_PARAMETERS",
    "PARAM_NAMES",
    "PrivacySettings",
    "fitins_adapter_mod",
    "secagg_reply_spec",
    "train_mods",
]

FITINS_PARAMETERS: Final = "fitins.parameters"
FITINS_CONFIG: Final = "fitins.config"
#: FitIns config key: JSON list of the parameter names, the order of FitIns/FitRes arrays.
PARAM_NAMES: Final = "param-names"
_METRIC_KEYS = ("train-loss", "train-accuracy", "seconds")


@dataclass(frozen=True)
class PrivacySettings:
    """The run's private-FedAvg settings (run config ``secagg``, ``dp-clip``, ``dp-noise``)."""

    secagg: bool = False
    dp_clip: float = 0.0
    dp_noise: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.dp_clip) and self.dp_clip >= 0):
            raise ValueError(f"dp-clip must be a finite number >= 0, got {self.dp_clip}")
        if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            raise ValueError(f"dp-noise must be a finite number >= 0, got {self.dp_noise}")
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise ValueError("dp-noise needs dp-clip (the noise is scaled by the clipping norm)")

    @property
    def dp(self) -> bool:
        return self.dp_clip > 0

    @property
    def private(self) -> bool:
        return self.secagg or self.dp

    def describe(self) -> str:
        parts = ["SecAgg+"] if self.secagg else []
        if self.dp:
            parts.append(f"DP (clip {self.dp_clip:g}, noise multiplier {self.dp_noise:g})")
        return " + ".join(parts) or "plain FedAvg"


# ------------------------------------------------------------------------ owners' mods
def _gate(applies: Any, mod: Mod) -> Mod:
    def gated(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.has_content() and applies(msg.content):
            return mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    gated.__name__ = f"gated_{getattr(mod, '__name__', type(mod).__name__)}"
    return gated


def _is_secagg(content: RecordDict) -> bool:
    return RECORD_KEY_CONFIGS in content.config_records


def _clips_fitins(content: RecordDict) -> bool:
    config = content.config_records.get(FITINS_CONFIG)
    return (
        FITINS_PARAMETERS in content.array_records
        and config is not None
        and (KEY_CLIPPING_NORM in config)
    )


def _clips_round(content: RecordDict) -> bool:
    config = content.config_records.get("train")
    return config is not None and KEY_CLIPPING_NORM in config and "global" in content


def fitins_adapter_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """A SecAgg+ round (legacy ``FitIns``) as the app's round request; the reply as a
    ``FitRes`` (parameters in ``param-names`` order, metrics, ``num-examples``)."""
    content = msg.content
    if FITINS_PARAMETERS not in content.array_records:
        return call_next(msg, ctxt)
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    names = json.loads(str(fitins.config[PARAM_NAMES]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} parameter names for {len(arrays)} arrays")
    request = train_request(
        "round",
        round_=int(fitins.config["round"]),
        head_kind=str(fitins.config["head-kind"]),
        global_arrays=ArrayRecord(
            {name: Array(np.asarray(a)) for name, a in zip(names, arrays, strict=True)}
        ),
    )
    msg.content = request  # the same message (a new one needs the runtime's task identity)
    try:
        reply = call_next(msg, ctxt)
    finally:
        msg.content = content
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    model = reply.content.array_records["model"]
    metrics = reply.content.metric_records["metrics"]
    fitres = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=ndarrays_to_parameters([model[name].numpy() for name in names]),
        num_examples=int(cast(int, metrics["num-examples"])),
        metrics={k: float(metrics[k]) for k in _METRIC_KEYS if k in metrics},  # type: ignore[arg-type]
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def train_mods() -> list[Mod]:
    """The owners' ``train`` mods, outermost first: SecAgg+ (only on its stage messages),
    legacy clipping (SecAgg+ rounds with DP), the FitIns adapter, Message-API clipping
    (rounds with DP and without SecAgg). A message none applies to passes through."""
    return [
        _gate(_is_secagg, secaggplus_mod),
        _gate(_clips_fitins, legacy_fixedclipping_mod),
        fitins_adapter_mod,
        _gate(_clips_round, fixedclipping_mod),
    ]


# ------------------------------------------------------------------------ allow-lists
def secagg_reply_spec(
    stage: str, template: Mapping[str, ArraySpec], sites: int, mod_range: int
) -> dict[str, RecordSpec]:
    """Allow-list of an owner's reply in a SecAgg+ stage: keys and key shares (bytes of
    bounded size), and in ``collect_masked_vectors`` exactly one masked vector per parameter
    (int64, the parameter's shape, values mod ``mod_range``) after the weight factor, with the
    legacy ``FitRes`` records around it: an *empty* parameters record, the training metrics,
    the number of examples and the status."""
    n = max(1, sites)
    if stage == Stage.SETUP:
        fields: dict[str, ValueSpec | PackedArraysSpec] = {
            Key.PUBLIC_KEY_1: ValueSpec((bytes,), max_len=1024),
            Key.PUBLIC_KEY_2: ValueSpec((bytes,), max_len=1024),
        }
        return {RECORD_KEY_CONFIGS: RecordSpec.configs(fields)}
    if stage == Stage.SHARE_KEYS:
        fields = {
            Key.DESTINATION_LIST: ValueSpec.integers(n),
            Key.CIPHERTEXT_LIST: ValueSpec.bytes_list(n, 4096),
        }
        return {RECORD_KEY_CONFIGS: RecordSpec.configs(fields)}
    if stage == Stage.UNMASK:
        fields = {
            Key.NODE_ID_LIST: ValueSpec.integers(2 * n),
            Key.SHARE_LIST: ValueSpec.bytes_list(2 * n, 1024),
        }
        return {RECORD_KEY_CONFIGS: RecordSpec.configs(fields)}
    if stage != Stage.COLLECT_MASKED_VECTORS:
        raise ValueError(f"unknown SecAgg+ stage {stage!r}")
    int64 = frozenset({"int64"})
    vectors = (
        ArraySpec((1,), int64),
        *(ArraySpec(spec.shape, int64) for spec in template.values()),
    )
    masked = PackedArraysSpec(vectors, below=mod_range)
    metrics = {k: ValueSpec.number() for k in _METRIC_KEYS}
    return {
        RECORD_KEY_CONFIGS: RecordSpec.configs({Key.MASKED_PARAMETERS: masked}),
        "fitres.parameters": RecordSpec.arrays({}),
        "fitres.metrics": RecordSpec.configs(metrics, optional=set(_METRIC_KEYS)),
        "fitres.num_examples": RecordSpec.metrics({"num_examples": ValueSpec.integer()}),
        "fitres.status": RecordSpec.configs(
            {"code": ValueSpec.integer(), "message": ValueSpec.string(256)}
        ),
    }


def fitins_config(round_: int, head_kind: str, names: list[str]) -> dict[str, Any]:
    """The FitIns config of a SecAgg+ round (what :func:`fitins_adapter_mod` reads)."""
    return {"round": int(round_), "head-kind": head_kind, PARAM_NAMES: json.dumps(names)}


def as_config(values: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord(dict(values))
