"""Owner endpoints as the operator writes them: ``MODALITY=HOST:PORT[,HOST:PORT...]`` (one
``--owner`` per modality, several sites after the ``=``) or a sites file, JSON
``{"audio": ["h1:50051", "h2:50051"], "image": "h3:50051"}``.

Both give a flat list of :class:`~jacfusion_fed.server.predict_types.OwnerEndpoint`, one per
site, which is what :class:`~jacfusion_fed.server.coordinator.Coordinator` takes. Every
problem is a ``ValueError`` naming the bad entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .predict_types import OwnerEndpoint

__all__ = ["load_sites", "parse_owners", "sites_by_modality"]


def parse_owners(texts: Iterable[str]) -> list[OwnerEndpoint]:
    """``["audio=h1:1,h2:1", "image=h3:1"]`` -> one endpoint per site, in the given order."""
    out: list[OwnerEndpoint] = []
    for text in texts:
        modality, sep, targets = text.partition("=")
        if not sep or not targets.strip():
            raise ValueError(f"owner {text!r} must look like MODALITY=HOST:PORT[,HOST:PORT...]")
        for target in targets.split(","):
            if not target.strip():
                raise ValueError(f"owner {text!r} has an empty address between commas")
            out.append(OwnerEndpoint(modality.strip(), target.strip()))
    _check_unique(out)
    return out


def load_sites(path: str | Path) -> list[OwnerEndpoint]:
    """The endpoints of a JSON sites file: modality -> address or list of addresses."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the sites file {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"sites file {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f'sites file {path} must be a JSON object {{"MODALITY": ["HOST:PORT", ...], ...}}'
        )
    out: list[OwnerEndpoint] = []
    for modality, targets in data.items():
        listed = [targets] if isinstance(targets, str) else targets
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(t, str) for t in listed)
        ):
            raise ValueError(
                f"sites file {path}: {modality!r} must name one address or a non-empty list of "
                "addresses (HOST:PORT)"
            )
        try:
            out.extend(OwnerEndpoint(modality, t.strip()) for t in listed)
        except ValueError as exc:
            raise ValueError(f"sites file {path}: {exc}") from exc
    _check_unique(out)
    return out


def sites_by_modality(endpoints: Iterable[OwnerEndpoint]) -> dict[str, list[str]]:
    """modality -> its sites' addresses, in order (for messages and logs)."""
    out: dict[str, list[str]] = {}
    for e in endpoints:
        out.setdefault(e.modality, []).append(e.target)
    return out


def _check_unique(endpoints: list[OwnerEndpoint]) -> None:
    seen: set[tuple[str, str]] = set()
    for e in endpoints:
        if (e.modality, e.target) in seen:
            raise ValueError(f"site {e.target} of modality {e.modality!r} is listed twice")
        seen.add((e.modality, e.target))
