"""A hospital's (requester's) client: send records to owners, ask the coordinator, forget.

::

    from jacfusion_fed.requester import Requester

    with Requester(
        coordinator="127.0.0.1:50060",
        owners={"image": "127.0.0.1:50061", "audio": "127.0.0.1:50062"},
        tls="certs/requesters/clinic",
        pseudonym_key="pseudonym.key",
    ) as hospital:
        hospital.submit("image", ["Jane Doe 1970-01-01"], x_image)   # (1, 1, 8, 8)
        hospital.submit("audio", ["Jane Doe 1970-01-01"], x_audio)
        answer = hospital.predict(["Jane Doe 1970-01-01"], method="jacobian")
        answer.ids, answer.probabilities, answer.labels, answer.modalities_used
        hospital.forget(["Jane Doe 1970-01-01"])

Local patient ids never leave this object: every id is pseudonymized here (HMAC-SHA256 under
the deployment key) before it is sent, and answers are mapped back to the local ids (with
``pseudonym_key=None`` and ``ids_are_pseudonyms=True`` the ids given already are pseudonyms).
gRPC errors propagate as ``grpc.RpcError`` with the server's status code and message.

Answers are :class:`~jacfusion_fed.answer.FusedAnswer` (the one type of a fused answer,
decoded by :mod:`jacfusion_fed.rpc.fusion_codec`), with the local ids attached. Each id is
pseudonymized once per call. ``GetModelInfo`` is asked once per coordinator connection and kept
(:meth:`Requester.model_info`) until an answer names other model versions than the kept info, or
the coordinator refuses a call with ``FAILED_PRECONDITION`` (its heads, versions or K changed).

``jacfusion-fed predict`` calls through :meth:`Requester.ask` (no numpy), so this module imports
numpy and the tensor codec only in :meth:`Requester.submit`: the CLI starts fast.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from jacfusion_fed.answer import FusedAnswer
from jacfusion_fed.privacy.cert_names import owner_server_name
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.fusion_codec import PredictOptions, answer_from_proto, options_to_proto
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc, modality_pb2
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2_grpc as mgrpc
from jacfusion_fed.rpc.tls import Insecure, Security, TlsFiles, create_channel

__all__ = ["Forgotten", "Requester", "Submitted", "load_labels"]


@dataclass(frozen=True)
class Submitted:
    """What an owner did with a ``submit`` batch."""

    modality: str
    stored: int
    replaced: int
    unchanged: int
    model_version: str
    batches: int = 1  # PutRecords calls it took


@dataclass(frozen=True)
class Forgotten:
    """Per modality: the local ids erased and those the owner did not hold."""

    deleted: dict[str, list[str]]
    unknown: dict[str, list[str]]


def load_labels(path: str | Path) -> dict[str, int]:
    """Labels by id from JSON: the requester's labels file (``deploy labels``: pseudonyms and
    labels per split, merged) or a plain object ``{id: label}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("splits"), dict):
        out: dict[str, int] = {}
        for split in data["splits"].values():
            out.update(zip(split["ids"], (int(v) for v in split["labels"]), strict=True))
        return out
    if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        return {str(k): int(v) for k, v in data.items()}
    raise ValueError(f"{path}: not a labels file ({{id: label}} or the requester's labels file)")


def _security(tls: Security | str | Path) -> Security:
    if isinstance(tls, (Insecure, TlsFiles)):
        return tls
    return TlsFiles.from_dir(Path(tls))


class Requester:
    """A requester's connections (see the module docstring).

    Args:
        coordinator: ``HOST:PORT`` of the coordinator, or a list of replicas' (one channel,
            round robin, retried; needed for :meth:`predict`).
        owners: ``{modality: "HOST:PORT"}`` of the owners (needed for :meth:`submit` and
            :meth:`forget`); each owner's certificate must name that modality.
        tls: the requester's certificate directory (or :class:`TlsFiles`).
        pseudonym_key: the deployment's key file, its bytes, or a :class:`Pseudonymizer`;
            None only with ``ids_are_pseudonyms``.
        timeout: deadline of each call in seconds.
        ids_are_pseudonyms: the ids given to every verb already are pseudonyms (sent as
            they are); needs ``pseudonym_key=None``.
    """

    def __init__(
        self,
        coordinator: str | Sequence[str] | None = None,
        owners: Mapping[str, str] | None = None,
        *,
        tls: Security | str | Path,
        pseudonym_key: str | Path | bytes | Pseudonymizer | None,
        timeout: float = 30.0,
        ids_are_pseudonyms: bool = False,
    ) -> None:
        self._security = _security(tls)
        self._pz: Pseudonymizer | None
        if (pseudonym_key is None) != ids_are_pseudonyms:
            raise ValueError(
                "pass a pseudonym_key to pseudonymize local ids, or pseudonym_key=None with "
                "ids_are_pseudonyms=True if the ids already are pseudonyms"
            )
        if pseudonym_key is None:
            self._pz = None
        elif isinstance(pseudonym_key, Pseudonymizer):
            self._pz = pseudonym_key
        elif isinstance(pseudonym_key, bytes):
            self._pz = Pseudonymizer(pseudonym_key)
        else:
            self._pz = Pseudonymizer.from_file(Path(pseudonym_key))
        self.timeout = timeout
        self.coordinator = [coordinator] if isinstance(coordinator, str) else coordinator
        self.owners = dict(owners or {})
        self._channels: dict[str, grpc.Channel] = {}
        self._info: fusion_pb2.GetModelInfoResponse | None = None

    # --- plumbing --------------------------------------------------------------------------

    @property
    def key_fingerprint(self) -> str:
        """The key's fingerprint ("" without a key: owners then do not check it)."""
        return self._pz.fingerprint if self._pz is not None else ""

    def pseudonyms(self, ids: Sequence[str]) -> list[str]:
        """The pseudonyms of local ids (what is sent instead of them)."""
        if isinstance(ids, str):
            raise TypeError("pass a list of ids, not one string")
        return list(ids) if self._pz is None else self._pz.many(ids)

    def _channel(self, key: str, target: str, server_name: str | None) -> grpc.Channel:
        if key not in self._channels:
            if isinstance(self._security, Insecure):
                self._channels[key] = create_channel(target, self._security)
            else:
                self._channels[key] = create_channel(
                    target, self._security, server_name=server_name
                )
        return self._channels[key]

    def _owner(self, modality: str) -> mgrpc.ModalityServiceStub:
        if modality not in self.owners:
            known = ", ".join(sorted(self.owners)) or "none"
            raise ValueError(f"no owner address for modality {modality!r} (known: {known})")
        channel = self._channel(
            f"owner:{modality}", self.owners[modality], owner_server_name(modality)
        )
        return mgrpc.ModalityServiceStub(channel)

    def _fusion(self) -> fusion_pb2_grpc.FusionServiceStub:
        if not self.coordinator:
            raise ValueError("no coordinator address given")
        if "coordinator" not in self._channels:
            self._channels["coordinator"] = connect_coordinator(self.coordinator, self._security)
        return fusion_pb2_grpc.FusionServiceStub(self._channels["coordinator"])

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._info = None

    def __enter__(self) -> Requester:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the three verbs -------------------------------------------------------------------

    def submit(
        self,
        modality: str,
        ids: Sequence[str],
        x: Any,
        *,
        replace: bool = False,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> Submitted:
        """Send records ``x`` (first axis = ``ids``, any number) to the owner of ``modality``,
        in ``PutRecords`` batches (:func:`jacfusion_fed.rpc.record_batches.put_in_batches`:
        a failure raises its ``SubmitError``; resending is idempotent). ``progress``: a bar on
        stderr (default: when it is a terminal)."""
        from jacfusion_fed.rpc import record_batches as rb

        with rb.terminal_progress(f"{modality}: PutRecords", progress) as bar:
            totals = rb.put_in_batches(
                self._owner(modality).PutRecords,
                ids,
                x,
                pseudonymize=self.pseudonyms,
                replace=replace,
                key_fingerprint=self.key_fingerprint,
                timeout=self.timeout,
                batch_size=batch_size or rb.DEFAULT_BATCH_SIZE,
                progress=bar,
            )
        return Submitted(
            modality,
            totals.stored,
            totals.replaced,
            totals.unchanged,
            totals.model_version,
            totals.batches,
        )

    def forget(self, ids: Sequence[str], modalities: Sequence[str] | None = None) -> Forgotten:
        """Erase the records of ``ids`` at every (or the given) owner."""
        sent = self.pseudonyms(ids)
        local = dict(zip(sent, ids, strict=True))
        deleted: dict[str, list[str]] = {}
        unknown: dict[str, list[str]] = {}
        for modality in modalities or sorted(self.owners):
            resp = self._owner(modality).DeleteRecords(
                modality_pb2.DeleteRecordsRequest(
                    sample_ids=sent, key_fingerprint=self.key_fingerprint
                ),
                timeout=self.timeout,
            )
            deleted[modality] = [local[s] for s in resp.deleted_sample_ids]
            unknown[modality] = [local[s] for s in resp.unknown_sample_ids]
        return Forgotten(deleted, unknown)

    def predict(
        self,
        ids: Sequence[str],
        *,
        method: str | None = None,
        gamma: float | Mapping[str, float] | None = None,
        regularize: Sequence[str] = (),
        iterations: int | None = None,
        modalities: Sequence[str] = (),
        require_all: bool = False,
        skip_unknown: bool = False,
        owner_timeout: float | None = None,
        center_logits: bool | None = None,
    ) -> FusedAnswer:
        """Fused predictions for local ``ids`` from the coordinator (``method="robust"``:
        also each modality's reliability, the prediction sets and the abstain flags); the
        answer's :attr:`~FusedAnswer.ids` are the local ids. ``center_logits`` (Jacobian
        fusion only): subtract each modality's mean logit first (None: the paper's method)."""
        options = PredictOptions(
            method=method,
            default_gamma=None if isinstance(gamma, Mapping) else gamma,
            gammas=dict(gamma) if isinstance(gamma, Mapping) else {},
            regularize=tuple(regularize),
            iterations=iterations,
            require_all=require_all,
            modalities=tuple(modalities),
            owner_timeout_s=owner_timeout,
            skip_unknown_ids=skip_unknown,
            center_logits=center_logits,
        )
        return self.ask(ids, options)

    def ask(
        self,
        ids: Sequence[str],
        options: PredictOptions,
        *,
        stream: bool = False,
        chunk_size: int = 0,
        pseudonyms: Sequence[str] | None = None,
    ) -> FusedAnswer:
        """The coordinator's checked answer for local ``ids`` (``Predict``, or
        ``PredictStream`` with ``stream``), with the local ids attached; what :meth:`predict`
        and ``jacfusion-fed predict`` share (no numpy). ``pseudonyms``: those of ``ids``
        when the caller already has them (ids are pseudonymized once)."""
        sent = self.pseudonyms(ids) if pseudonyms is None else list(pseudonyms)
        local = {} if self._pz is None else dict(zip(sent, ids, strict=True))
        opts = options_to_proto(options)
        try:
            if stream:
                request = fusion_pb2.PredictStreamRequest(
                    sample_ids=sent, options=opts, chunk_size=chunk_size
                )
                chunks = self._fusion().PredictStream(request, timeout=self.timeout)
                parts = [answer_from_proto(r.predictions) for r in chunks]
                answer = dataclasses.replace(FusedAnswer.join(parts), local_ids=local)
            else:
                single = fusion_pb2.PredictRequest(sample_ids=sent, options=opts)
                reply = self._fusion().Predict(single, timeout=self.timeout)
                answer = answer_from_proto(reply.predictions, local)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self._info = None  # heads, versions, K or calibrations changed: ask again
            raise
        if self._info is not None:
            kept = {m.modality: m.model_version for m in self._info.modalities}
            if any(
                c.model_version and kept.get(c.modality) != c.model_version
                for c in answer.modalities
            ):
                self._info = None  # the answer used model versions the kept info lacks
        return answer

    def model_info(self, *, refresh: bool = False) -> fusion_pb2.GetModelInfoResponse:
        """The coordinator's ``GetModelInfo`` (classes, registered modalities, prior), asked
        once and kept until an answer names other model versions, a call fails with
        ``FAILED_PRECONDITION``, or ``refresh``."""
        if self._info is None or refresh:
            self._info = self._fusion().GetModelInfo(
                fusion_pb2.GetModelInfoRequest(), timeout=self.timeout
            )
        return self._info

    def rekey_map(self, ids: Sequence[str], new_key: bytes | Pseudonymizer) -> dict[str, str]:
        """``{old pseudonym: new pseudonym}`` of local ``ids`` for an owner's key rotation
        (``jacfusion-fed owner rekey --map``); the owner learns no local id from it."""
        new = new_key if isinstance(new_key, Pseudonymizer) else Pseudonymizer(new_key)
        return dict(zip(self.pseudonyms(ids), new.many(ids), strict=True))
