"""The messages between the coordinator (ServerApp) and the modality owners (ClientApps).

Every message type, record name, field and error code of the jacfusion Flower app is defined
here, next to the allow-lists the coordinator applies to every reply (`check_reply_allowed`).
No ML in here: perturbation settings travel as opaque strings (the owner parses them with
:class:`jacfusion_fed.owner.perturbation.PerturbationSpec`).

Messages (coordinator -> owner; the reply records are *all* an owner may send back):

``query.describe``
    request: nothing. reply: ``info`` (ConfigRecord: modality, owner, num-classes, version of
    the current model or "", model-spec = JSON of the architecture, input shape of one sample
    and K; needed to start FedAvg from one common initial model).

``train``
    request: ``train`` (ConfigRecord: stage, round, head-kind) and, for FedAvg stages,
    ``global`` (ArrayRecord: the global model's parameters).

    - stage ``local``: train alone (method, epochs, lr, ... from the run config), publish the
      model to the owner's store, reply with the head.
    - stage ``round``: one FedAvg round for a modality held by several sites: train from
      ``global`` without publishing, reply ``model`` (the same parameter names, shapes and
      dtypes as ``global``, checked against the coordinator's own template), ``metrics``
      (``num-examples`` is the FedAvg weight) and ``info``.
    - stage ``publish``: store ``global`` as a new version (every site of the modality gets the
      same content-hashed version), reply with the head.

    head reply: ``head`` (ArrayRecord: ``gram`` (K, K), or ``weight`` (K, H) and ``bias``
    (K,) when the run asks for the full head and the owner allows it; ``class-counts`` (K,)
    int64), ``metrics`` (MetricRecord: train-loss, train-accuracy, num-examples, seconds),
    ``info`` (ConfigRecord: modality, owner, version).

``query.head``
    request: ``head`` (ConfigRecord: version, "" for the current one; head-kind).
    reply: the head reply of ``train`` (metrics: what the store recorded at training time).

``query``
    request: ``query`` (ConfigRecord: sample-ids (pseudonyms), version, settings (list of
    "clean" or a perturbation's JSON), seed, allow-partial).
    reply: ``logits`` (ArrayRecord: ``s0`` .. ``s{S-1}`` of shape (N, K), one per setting in
    request order, optionally ``u0`` .. ``u{S-1}`` (N,) float64, the owner's detector
    p-value of each row (issue 20; 1 where not known), and ``known`` (N,) bool) and ``info``
    (modality, owner, version). N is the number of requested ids; rows of ids the owner does
    not hold are zero and ``known`` is false there. Without ``allow-partial`` an owner refuses
    a request with unknown ids.

Errors come back as Flower error replies (``Message(Error(code, reason), reply_to=msg)``) with
the codes of `AppErrorCode`, never as a crash of the owner.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from jacfusion_fed.fusion.robust import CALIBRATION_FIELDS

from .allowlist import ArraySpec, RecordSpec, ValueSpec

__all__ = [
    "CALIBRATION_RECORD",
    "CALIBRATION_WIRE",
    "CLEAN",
    "EVAL_LABELS_FORMAT",
    "MAX_QUERY_IDS",
    "MSG_DESCRIBE",
    "MSG_HEAD",
    "MSG_QUERY",
    "MSG_TRAIN",
    "AppError",
    "AppErrorCode",
    "HeadRequest",
    "MalformedRequestError",
    "QueryRequest",
    "TrainRequest",
    "app_error_name",
    "calibration_reply_spec",
    "describe_reply_spec",
    "head_reply_spec",
    "head_request",
    "is_pseudonym",
    "model_template",
    "parse_head_request",
    "parse_query_request",
    "parse_train_request",
    "pvalue_field",
    "query_reply_spec",
    "query_request",
    "round_reply_spec",
    "setting_field",
    "train_request",
]

EVAL_LABELS_FORMAT = "jacfusion-eval-labels/v1"
"""Format tag of the requester's pseudonym -> label file for the evaluation ids."""

MSG_DESCRIBE = "query.describe"
MSG_HEAD = "query.head"
MSG_QUERY = "query"
MSG_TRAIN = "train"

CLEAN = "clean"
STAGES = ("local", "round", "publish")
HEAD_KINDS = ("gram", "full")
MAX_QUERY_IDS = 200_000
MAX_SETTINGS = 256
_MAX_SETTING_LEN = 512
_VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
_PSEUDONYM_RE = re.compile(r"^(?:[0-9a-f]{64}|[a-z2-7]{52})$")


class AppErrorCode:
    """Codes of the owners' error replies (Flower's own codes are 0..8)."""

    MALFORMED_REQUEST = 100
    UNKNOWN_IDS = 101
    UNKNOWN_VERSION = 102
    NO_MODEL = 103
    NOT_PERMITTED = 104
    BAD_INPUT_RANGE = 105


_NAMES = {v: k for k, v in vars(AppErrorCode).items() if k.isupper()}


def app_error_name(code: int) -> str:
    """``UNKNOWN_IDS`` for 101, etc.; ``CODE_<n>`` for codes not defined here."""
    return _NAMES.get(code, f"CODE_{code}")


class AppError(Exception):
    """Raised by an owner's handler; becomes an error reply with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = int(code), str(reason)
        super().__init__(f"{app_error_name(self.code)}: {self.reason}")


class MalformedRequestError(AppError):
    def __init__(self, reason: str) -> None:
        super().__init__(AppErrorCode.MALFORMED_REQUEST, reason)


def is_pseudonym(value: object) -> bool:
    """64 lowercase hex digits or 52 lowercase base32 characters (HMAC-SHA256)."""
    return isinstance(value, str) and bool(_PSEUDONYM_RE.match(value))


# ------------------------------------------------------------------------ request helpers
def _record(content: RecordDict, name: str) -> ConfigRecord:
    if not isinstance(content, RecordDict) or name not in content:
        raise MalformedRequestError(f"request has no {name!r} record")
    record = content[name]
    if not isinstance(record, ConfigRecord):
        raise MalformedRequestError(f"request record {name!r} is not a ConfigRecord")
    return record


def _get(record: ConfigRecord, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in record:
        raise MalformedRequestError(f"{what}: field {key!r} missing")
    value = record[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise MalformedRequestError(f"{what}: field {key!r} has the wrong type (bool)")
    if not isinstance(value, kind):
        raise MalformedRequestError(
            f"{what}: field {key!r} has type {type(value).__name__}, expected "
            + (kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind))
        )
    return value


def _check_version(value: str, what: str) -> str:
    if value and not _VERSION_RE.match(value):
        raise MalformedRequestError(f"{what}: model version {value!r} is not 16 hex digits")
    return value


def _check_head_kind(value: str, what: str) -> str:
    if value not in HEAD_KINDS:
        raise MalformedRequestError(f"{what}: head-kind must be one of {HEAD_KINDS}")
    return value


@dataclass(frozen=True)
class TrainRequest:
    stage: str
    round: int
    head_kind: str
    global_arrays: ArrayRecord | None


def train_request(
    stage: str,
    *,
    round_: int = 0,
    head_kind: str = "gram",
    global_arrays: ArrayRecord | None = None,
) -> RecordDict:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    records: dict[str, Any] = {
        "train": ConfigRecord({"stage": stage, "round": int(round_), "head-kind": head_kind})
    }
    if global_arrays is not None:
        records["global"] = global_arrays
    return RecordDict(records)


def parse_train_request(content: RecordDict) -> TrainRequest:
    what = "train request"
    rec = _record(content, "train")
    stage = _get(rec, "stage", str, what)
    if stage not in STAGES:
        raise MalformedRequestError(f"{what}: stage must be one of {STAGES}, got {stage!r}")
    round_ = _get(rec, "round", int, what)
    head_kind = _check_head_kind(_get(rec, "head-kind", str, what), what)
    arrays = content.get("global") if "global" in content else None
    if arrays is not None and not isinstance(arrays, ArrayRecord):
        raise MalformedRequestError(f"{what}: 'global' is not an ArrayRecord")
    if stage == "publish" and arrays is None:
        raise MalformedRequestError(f"{what}: stage 'publish' needs the 'global' model")
    extra = set(content.keys()) - {"train", "global"}
    if extra:
        raise MalformedRequestError(f"{what}: unexpected record(s) {sorted(extra)}")
    return TrainRequest(stage, round_, head_kind, arrays)


@dataclass(frozen=True)
class HeadRequest:
    version: str
    head_kind: str


def head_request(version: str = "", head_kind: str = "gram") -> RecordDict:
    return RecordDict({"head": ConfigRecord({"version": version, "head-kind": head_kind})})


def parse_head_request(content: RecordDict) -> HeadRequest:
    what = "head request"
    rec = _record(content, "head")
    version = _check_version(_get(rec, "version", str, what), what)
    return HeadRequest(version, _check_head_kind(_get(rec, "head-kind", str, what), what))


@dataclass(frozen=True)
class QueryRequest:
    sample_ids: list[str]
    version: str
    settings: list[str]
    seed: int
    allow_partial: bool


def query_request(
    sample_ids: Sequence[str],
    version: str,
    settings: Sequence[str] = (CLEAN,),
    *,
    seed: int = 0,
    allow_partial: bool = False,
) -> RecordDict:
    return RecordDict(
        {
            "query": ConfigRecord(
                {
                    "sample-ids": [str(s) for s in sample_ids],
                    "version": version,
                    "settings": [str(s) for s in settings],
                    "seed": int(seed),
                    "allow-partial": bool(allow_partial),
                }
            )
        }
    )


def parse_query_request(content: RecordDict) -> QueryRequest:
    """Check a query's shape (types, sizes, id format); raise `MalformedRequestError`."""
    what = "query"
    rec = _record(content, "query")
    ids = _get(rec, "sample-ids", list, what)
    if not ids:
        raise MalformedRequestError(f"{what}: sample-ids is empty")
    if len(ids) > MAX_QUERY_IDS:
        raise MalformedRequestError(f"{what}: {len(ids)} sample ids > {MAX_QUERY_IDS}")
    bad = [i for i, s in enumerate(ids) if not is_pseudonym(s)]
    if bad:  # positions only: a value that is not a pseudonym may be a raw patient id
        raise MalformedRequestError(
            f"{what}: {len(bad)} sample id(s) are not pseudonyms (HMAC-SHA256, 64 hex digits), "
            f"first at position {bad[0]}"
        )
    if len(set(ids)) != len(ids):
        raise MalformedRequestError(f"{what}: duplicate sample ids")
    version = _check_version(_get(rec, "version", str, what), what)
    settings = _get(rec, "settings", list, what)
    if not settings or len(settings) > MAX_SETTINGS:
        raise MalformedRequestError(f"{what}: between 1 and {MAX_SETTINGS} settings required")
    if any(not isinstance(s, str) or not s or len(s) > _MAX_SETTING_LEN for s in settings):
        raise MalformedRequestError(f"{what}: every setting must be a non-empty short string")
    seed = _get(rec, "seed", int, what)
    allow_partial = _get(rec, "allow-partial", bool, what)
    extra = set(rec.keys()) - {"sample-ids", "version", "settings", "seed", "allow-partial"}
    if extra:
        raise MalformedRequestError(f"{what}: unexpected field(s) {sorted(extra)}")
    return QueryRequest(
        [str(s) for s in ids], version, [str(s) for s in settings], seed, allow_partial
    )


def setting_field(index: int) -> str:
    """Name of the logits array of the ``index``-th setting in a query reply."""
    return f"s{index}"


def pvalue_field(index: int) -> str:
    """Name of the detector p-values (N,) of the ``index``-th setting in a query reply
    (issue 20; optional: an owner without a detector sends none)."""
    return f"u{index}"


# ------------------------------------------------------------------------ allow-lists
_INFO = {
    "modality": ValueSpec.string(128),
    "owner": ValueSpec.string(128),
    "version": ValueSpec.string(16),
}
_METRICS = RecordSpec.metrics(
    {
        "train-loss": ValueSpec.number(),
        "train-accuracy": ValueSpec.number(),
        "num-examples": ValueSpec.integer(),
        "seconds": ValueSpec.number(),
    },
    optional={"train-loss", "train-accuracy", "seconds"},
)


def describe_reply_spec() -> dict[str, RecordSpec]:
    return {
        "info": RecordSpec.configs(
            {**_INFO, "num-classes": ValueSpec.integer(), "model-spec": ValueSpec.string(1024)}
        )
    }


def head_reply_spec(head_kind: str) -> dict[str, RecordSpec]:
    """Allow-list of a head reply (dims: ``K``; ``H`` is bound by W for the full head)."""
    counts = {"class-counts": ArraySpec(("K",), frozenset({"int64"}))}
    if head_kind == "gram":
        head = RecordSpec.arrays({"gram": ArraySpec(("K", "K")), **counts})
    elif head_kind == "full":
        head = RecordSpec.arrays(
            {"weight": ArraySpec(("K", "H")), "bias": ArraySpec(("K",)), **counts}
        )
    else:
        raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {head_kind!r}")
    return {
        "head": head,
        "metrics": _METRICS,
        "info": RecordSpec.configs(_INFO),
        **calibration_reply_spec(required=False),
    }


#: Name of the owner's calibration record (published next to its head, for robust fusion).
CALIBRATION_RECORD = "calibration"
#: Wire names of the calibration's arrays (hyphens) and their shapes: ``K`` the head's classes,
#: ``V`` the owner's validation samples (both score arrays have that one length).
CALIBRATION_WIRE: dict[str, str] = {f: f.replace("_", "-") for f in CALIBRATION_FIELDS}
_CALIBRATION_SHAPES: dict[str, tuple[int | str, ...]] = {
    "class_means": ("K", "K"),
    "precision": ("K", "K"),
    "typicality_scores": ("V",),
    "conformity_scores": ("V",),
}


def calibration_reply_spec(*, required: bool = True) -> dict[str, RecordSpec]:
    """Allow-list entry of the calibration record (dims ``K``, ``V``; float64 only)."""
    f64 = frozenset({"float64"})
    fields = {
        CALIBRATION_WIRE[f]: ArraySpec(_CALIBRATION_SHAPES[f], f64) for f in CALIBRATION_FIELDS
    }
    return {CALIBRATION_RECORD: RecordSpec.arrays(fields, required=required)}


def model_template(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """Exact names, shapes and dtypes of a model's parameters (the FedAvg reply allow-list)."""
    return {
        name: ArraySpec(tuple(int(d) for d in arr.shape), frozenset({str(arr.dtype)}))
        for name, arr in arrays.items()
    }


def round_reply_spec(template: Mapping[str, ArraySpec]) -> dict[str, RecordSpec]:
    """Allow-list of a FedAvg round reply: exactly the global model's parameters."""
    return {
        "model": RecordSpec.arrays(dict(template)),
        "metrics": _METRICS,
        "info": RecordSpec.configs(_INFO),
    }


def query_reply_spec(num_settings: int) -> dict[str, RecordSpec]:
    """Allow-list of a logits reply (dims: ``N`` = requested ids, ``K``)."""
    fields: dict[str, ArraySpec] = {
        setting_field(i): ArraySpec(("N", "K")) for i in range(num_settings)
    }
    pvalues = {
        pvalue_field(i): ArraySpec(("N",), frozenset({"float64"})) for i in range(num_settings)
    }
    fields.update(pvalues)
    fields["known"] = ArraySpec(("N",), frozenset({"bool"}))
    return {
        "logits": RecordSpec.arrays(fields, optional=set(pvalues)),
        "info": RecordSpec.configs(_INFO),
    }


# ------------------------------------------------------------------------ reply helpers
def info_record(modality: str, owner: str, version: str, **extra: Any) -> ConfigRecord:
    return ConfigRecord({"modality": modality, "owner": owner, "version": version, **extra})


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def model_spec_json(spec: Mapping[str, Any]) -> str:
    return json.dumps(dict(spec), sort_keys=True, separators=(",", ":"))
