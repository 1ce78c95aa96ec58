"""The fused answer of one ``Predict``: :class:`FusedAnswer`, the one type of it.

The coordinator builds it (``server/assembly.py``), the FusionService codec
(:mod:`jacfusion_fed.rpc.fusion_codec`) encodes it as ``Predictions`` and decodes it back
(appending the chunks of a stream with :meth:`FusedAnswer.join`), and the requester's client
(:class:`jacfusion_fed.requester.Requester`) and ``jacfusion-fed predict`` read it.

Its fields are plain Python values in the wire's layout, so that ``predict`` (which must start
fast) never imports numpy: the probabilities are the n x K float64 little-endian bytes of
fusion.proto's ``Matrix``. Arrays come from the numpy accessors (:attr:`~FusedAnswer.
probabilities`, :attr:`~FusedAnswer.labels`, :attr:`~FusedAnswer.prediction_sets`,
:attr:`~FusedAnswer.abstain`, :attr:`Contribution.used_mask`), which import numpy when first
called. What the ``robust`` method adds is typed: per sample its conformal prediction set and
abstain flag (:class:`RobustParts`), per modality and sample its reliability
(:attr:`Contribution.reliability`).

This module imports nothing of the project (it sits in the bottom layer).
"""

from __future__ import annotations

import dataclasses
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Contribution", "FusedAnswer", "RobustParts", "SiteStatus"]


def _numpy() -> ModuleType:
    """numpy, imported by the first accessor that needs it (``predict`` never does)."""
    import numpy

    return numpy


@dataclass(frozen=True)
class SiteStatus:
    """One site of a modality served by several sites (``SiteStatus`` in fusion.proto)."""

    target: str
    model_version: str = ""
    error: str = ""
    samples: int = 0  # predicted samples of the batch whose logits came from this site


@dataclass(frozen=True)
class Contribution:
    """How one selected modality took part in an answer (``ModalityContribution``).

    Attributes:
        used: per sample, whether this modality's logits went into it.
        reliability: ``robust`` method only: per sample its reliability in [0, 1] (0 where
            not used); None otherwise.
        sites: with several sites per modality: each site's part (a stream's chunks merged:
            samples summed, the first error kept).
        ambiguous_sample_ids: ids held by more than one of its sites (never used from it).
    """

    modality: str
    owner: str
    model_version: str
    used: list[bool]
    gamma: float = 0.0
    regularized: bool = False
    error: str = ""
    reliability: list[float] | None = None
    sites: list[SiteStatus] = field(default_factory=list)
    ambiguous_sample_ids: list[str] = field(default_factory=list)

    @property
    def used_mask(self) -> np.ndarray:
        """:attr:`used` as an (n,) bool array."""
        xp = _numpy()
        out: np.ndarray = xp.asarray(self.used, dtype=bool)
        return out

    @property
    def reliability_array(self) -> np.ndarray | None:
        """:attr:`reliability` as an (n,) float64 array (None unless ``robust``)."""
        xp = _numpy()
        if self.reliability is None:
            return None
        out: np.ndarray = xp.asarray(self.reliability, xp.float64)
        return out

    @property
    def samples_used(self) -> int:
        return sum(self.used)

    @property
    def site_errors(self) -> list[str]:
        """``"ADDRESS: error"`` of each site that failed."""
        return [f"{site.target}: {site.error}" for site in self.sites if site.error]


@dataclass(frozen=True)
class RobustParts:
    """What the ``robust`` method says per sample besides the probabilities."""

    prediction_sets: list[list[int]]  # class indices in each sample's conformal set
    abstain: list[bool]  # whether not to trust the sample's label


def _merge_sites(known: list[SiteStatus], more: Sequence[SiteStatus]) -> list[SiteStatus]:
    out = list(known)
    for site in more:
        at = next((i for i, k in enumerate(out) if k.target == site.target), None)
        if at is None:
            out.append(site)
        else:
            old = out[at]
            out[at] = dataclasses.replace(
                old, samples=old.samples + site.samples, error=old.error or site.error
            )
    return out


@dataclass(frozen=True)
class FusedAnswer:
    """Fused predictions of a batch; rows follow :attr:`sample_ids` (the predicted ids).

    Attributes:
        method: the fusion method's name (``jacobian``, ``robust``, ...).
        num_classes: K.
        sample_ids: the predicted ids (pseudonyms), in request order.
        probability_data: the (n, K) probabilities as float64 little-endian bytes, row-major
            (fusion.proto's ``Matrix.data``; see :attr:`probabilities`).
        predicted_labels: per sample the class index with the largest probability.
        modalities: one :class:`Contribution` per selected modality, in selection order.
        unpredicted_sample_ids: ids that could not be predicted (``skip_unknown_ids``).
        robust: the ``robust`` method's prediction sets and abstain flags (else None).
        local_ids: pseudonym -> local id, where the requester knows it (else empty).
    """

    method: str
    num_classes: int
    sample_ids: list[str]
    probability_data: bytes
    predicted_labels: list[int]
    modalities: list[Contribution]
    unpredicted_sample_ids: list[str] = field(default_factory=list)
    robust: RobustParts | None = None
    local_ids: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, k = len(self.sample_ids), self.num_classes
        if len(self.probability_data) != n * k * 8 or len(self.predicted_labels) != n:
            raise ValueError(
                f"malformed answer: {len(self.probability_data)} bytes of probabilities and "
                f"{len(self.predicted_labels)} labels for {n} samples of K={k}"
            )
        for c in self.modalities:
            if len(c.used) != n or (c.reliability is not None and len(c.reliability) != n):
                raise ValueError(f"malformed answer: {c.modality!r} flags {len(c.used)} of {n}")
        if self.robust is not None and (
            len(self.robust.prediction_sets) != n or len(self.robust.abstain) != n
        ):
            raise ValueError(
                f"malformed answer: {len(self.robust.prediction_sets)} prediction sets, "
                f"{len(self.robust.abstain)} abstain flags for {n} samples"
            )

    # --- numpy accessors ------------------------------------------------------------------

    @property
    def probabilities(self) -> np.ndarray:
        """(n, K) float64, rows sum to 1 (a read-only view of :attr:`probability_data`)."""
        xp = _numpy()
        flat = xp.frombuffer(self.probability_data, dtype="<f8")
        out: np.ndarray = flat.reshape(len(self.sample_ids), self.num_classes)
        return out

    @property
    def labels(self) -> np.ndarray:
        """(n,) int64 predicted class indices."""
        xp = _numpy()
        out: np.ndarray = xp.asarray(self.predicted_labels, dtype=xp.int64).reshape(-1)
        return out

    @property
    def prediction_sets(self) -> np.ndarray | None:
        """(n, K) bool conformal prediction sets (``robust`` only, else None)."""
        if self.robust is None:
            return None
        xp = _numpy()
        sets: np.ndarray = xp.zeros((len(self.sample_ids), self.num_classes), dtype=bool)
        for i, members in enumerate(self.robust.prediction_sets):
            sets[i, members] = True
        return sets

    @property
    def abstain(self) -> np.ndarray | None:
        """(n,) bool abstain flags (``robust`` only, else None)."""
        if self.robust is None:
            return None
        xp = _numpy()
        out: np.ndarray = xp.asarray(self.robust.abstain, dtype=bool).reshape(-1)
        return out

    # --- plain accessors (no numpy) -------------------------------------------------------

    def probability_rows(self) -> list[list[float]]:
        """The probabilities as n lists of K floats."""
        values = array("d", self.probability_data)
        if sys.byteorder == "big":
            values.byteswap()
        k = self.num_classes
        return [values[i * k : (i + 1) * k].tolist() for i in range(len(self.sample_ids))]

    @property
    def ids(self) -> list[str]:
        """The predicted ids as the requester knows them (local id where known)."""
        return [self.local_ids.get(s, s) for s in self.sample_ids]

    @property
    def unpredicted(self) -> list[str]:
        """The unpredicted ids as the requester knows them (local id where known)."""
        return [self.local_ids.get(s, s) for s in self.unpredicted_sample_ids]

    @property
    def modalities_used(self) -> list[list[str]]:
        """Per sample, the modalities whose logits went into it."""
        return [
            [c.modality for c in self.modalities if c.used[i]] for i in range(len(self.sample_ids))
        ]

    @property
    def model_versions(self) -> dict[str, str]:
        """Modality -> the model version whose logits were used."""
        return {c.modality: c.model_version for c in self.modalities}

    @property
    def errors(self) -> dict[str, str]:
        """Modality -> error of an owner that was left out."""
        return {c.modality: c.error for c in self.modalities if c.error}

    def reliability(self, i: int) -> dict[str, float]:
        """``robust`` only: sample ``i``'s reliability per modality used (else empty)."""
        return {
            c.modality: c.reliability[i]
            for c in self.modalities
            if c.used[i] and c.reliability is not None
        }

    def accuracy(self, labels: Mapping[str, int]) -> float:
        """Share of predicted samples whose label equals ``labels[id]``, keyed by local id or
        by pseudonym (as in the requester's labels file); samples without a label skipped."""
        pairs = []
        for sent, pred in zip(self.sample_ids, self.predicted_labels, strict=True):
            local = self.local_ids.get(sent, sent)
            key = local if local in labels else sent
            if key in labels:
                pairs.append((pred, int(labels[key])))
        if not pairs:
            raise ValueError("no predicted sample has a label")
        return sum(p == t for p, t in pairs) / len(pairs)

    def to_json(self, names: Sequence[str]) -> dict[str, Any]:
        """The answer with the names the ``predict`` table shows (class names, local ids)."""

        def label_name(label: int) -> str:
            return names[label] if label < len(names) else str(label)

        rows = self.probability_rows()
        samples = []
        for i, sid in enumerate(self.sample_ids):
            label = self.predicted_labels[i]
            sample: dict[str, Any] = {
                "sample_id": sid,
                **({"local_id": self.local_ids[sid]} if sid in self.local_ids else {}),
                "label": label_name(label),
                "label_index": label,
                "probabilities": rows[i],
                "modalities": [c.modality for c in self.modalities if c.used[i]],
            }
            if self.robust is not None:
                sample["reliability"] = self.reliability(i)
                sample["prediction_set"] = [label_name(k) for k in self.robust.prediction_sets[i]]
                sample["abstain"] = self.robust.abstain[i]
            samples.append(sample)
        shown = ("modality", "owner", "model_version", "gamma", "regularized", "error")
        return {
            "method": self.method,
            "class_names": list(names),
            "modalities": [
                {
                    **{k: getattr(c, k) for k in shown},
                    "samples_used": c.samples_used,
                    **({"site_errors": c.site_errors} if c.site_errors else {}),
                    **(
                        {"ambiguous_sample_ids": c.ambiguous_sample_ids}
                        if c.ambiguous_sample_ids
                        else {}
                    ),
                }
                for c in self.modalities
            ],
            "samples": samples,
            "unpredicted_sample_ids": self.unpredicted,
        }

    # --- streams --------------------------------------------------------------------------

    @classmethod
    def join(cls, parts: Sequence[FusedAnswer]) -> FusedAnswer:
        """The chunks of one stream as one answer (rows appended; per modality the first
        error kept, sites merged)."""
        if not parts:
            raise ValueError("an answer needs at least one part")
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        k = next((p.num_classes for p in parts if p.num_classes), 0)
        modalities = []
        for i, c in enumerate(first.modalities):
            cs = [p.modalities[i] for p in parts]
            if any(x.modality != c.modality for x in cs):
                raise ValueError("malformed answer: the chunks name different modalities")
            sites: list[SiteStatus] = []
            for x in cs:
                sites = _merge_sites(sites, x.sites)
            rel = [x.reliability for x in cs]
            modalities.append(
                dataclasses.replace(
                    c,
                    used=[u for x in cs for u in x.used],
                    error=next((x.error for x in cs if x.error), ""),
                    reliability=None
                    if all(r is None for r in rel)
                    else [v for x in cs for v in (x.reliability or [0.0] * len(x.used))],
                    sites=sites,
                    ambiguous_sample_ids=[a for x in cs for a in x.ambiguous_sample_ids],
                )
            )
        robust = None
        if any(p.robust is not None for p in parts):
            robust = RobustParts(
                [s for p in parts for s in (p.robust.prediction_sets if p.robust else [])],
                [a for p in parts for a in (p.robust.abstain if p.robust else [])],
            )
        return cls(
            method=parts[-1].method,
            num_classes=k,
            sample_ids=[s for p in parts for s in p.sample_ids],
            probability_data=b"".join(p.probability_data for p in parts),
            predicted_labels=[x for p in parts for x in p.predicted_labels],
            modalities=modalities,
            unpredicted_sample_ids=[s for p in parts for s in p.unpredicted_sample_ids],
            robust=robust,
            local_ids={k: v for p in parts for k, v in p.local_ids.items()},
        )
