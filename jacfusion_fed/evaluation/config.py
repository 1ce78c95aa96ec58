"""What an evaluation runs: :class:`EvaluationConfig` (the user's knobs) and the per-dataset
presets (columns, sweeps, architectures, training settings) it expands to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jacfusion_fed.robustness import AttackSpec, BiasNoise, Corruption, GaussianNoise
from jacfusion_fed.robustness import MissingEntries as Missing

from .gamma import GAMMA_CANDIDATES

__all__ = [
    "METHOD_ABBREV",
    "PRESETS",
    "ColumnSpec",
    "DatasetPreset",
    "EvaluationConfig",
    "SweepSpec",
    "TablePreset",
    "config_from_options",
]

METHOD_ABBREV = {
    "regular": "regT",
    "adversarial": "advT",
    "free": "freT",
    "stability": "staT",
    "mixup": "mixT",
}
ALL_METHODS: tuple[str, ...] = tuple(METHOD_ABBREV)


@dataclass(frozen=True)
class EvaluationConfig:
    """Parameters of :func:`jacfusion_fed.evaluation.run_evaluation`.

    The CLI ``jacfusion-fed evaluate`` maps its options onto these fields.

    Attributes:
        dataset: ``"avdigits"`` (Tables 1-2 analogues, Figure 4 curves) or ``"twomoon"``
            (a TwoMoon table, Figures 2-3 heatmaps).
        quick: small data, fewer epochs and repeats, short sweeps (for tests and demos; the
            numbers are not meant to be reported).
        seed: data generation (and, with one training seed, weight initialization, training
            order and all perturbation draws) derive from it.
        seeds: training seeds ``seed, seed + 1, ..., seed + seeds - 1``: every net is trained
            once per training seed on the same data (those of ``seed``), the perturbation
            draws follow the training seed, and the tables report the mean over the seeds,
            the seed spread and cluster bootstrap intervals (test samples resampled with all
            their seeds together).
        repeats: how often the random corruptions (Gaussian noise, missing entries, bias
            patches) are redrawn on the test split; the tables report mean +- std over these
            draws. None: the preset's default (5 full, 2 quick).
        attack_repeats: draws of PGD's random start (setting 1, adaptive and sweeps). PGD on
            the audio CNN dominates the run time, so the default is 1 (no std). FGSM is
            deterministic and always computed once.
        gamma: a fixed gamma for every Jacobian row; None selects per pair and column from
            ``gamma_candidates`` on the validation split (see :func:`select_gamma`).
        gamma_candidates: the grid for that selection (the paper's {0.1, 0.5, 0.9}).
        perturbed: which modalities to perturb, one table each (None: all of the preset's
            tables, e.g. ``("audio", "image")`` for AV-Digits).
        methods: training methods of the perturbed modality's nets (rows 1..5 of the tables).
        adaptive: add setting-2 columns (FGSM / PGD end to end through each fusion rule).
        curves: compute the Figure 4/6/7 accuracy-vs-size sweeps.
        heatmaps: compute the TwoMoon Figure 2-3 heatmaps (TwoMoon only).
        epochs: training epochs for every net (None: the preset's per-modality default).
        cache_dir: where trained nets are cached (None: ``<data cache>/models``).
        retrain: ignore cached nets (they are overwritten).
        threads: ``torch.set_num_threads`` for the run (None: leave torch's setting). The
            nets are small, so one thread per process is fastest (and far faster than two on
            a busy machine).
        workers: processes that train missing nets in parallel (1: train in this process).
    """

    dataset: str = "avdigits"
    quick: bool = False
    seed: int = 0
    seeds: int = 1
    repeats: int | None = None
    attack_repeats: int = 1
    gamma: float | None = None
    gamma_candidates: tuple[float, ...] = GAMMA_CANDIDATES
    perturbed: tuple[str, ...] | None = None
    methods: tuple[str, ...] = ALL_METHODS
    adaptive: bool = True
    curves: bool = True
    heatmaps: bool = True
    epochs: int | None = None
    cache_dir: Path | None = None
    retrain: bool = False
    threads: int | None = 1
    workers: int = 2

    def __post_init__(self) -> None:
        if self.dataset not in PRESETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(PRESETS)}")
        if self.repeats is not None and (
            isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1
        ):
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats!r}")
        for name in ("attack_repeats", "workers", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.gamma is not None and not 0.0 < float(self.gamma) <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if not self.gamma_candidates or any(not 0 < g <= 1 for g in self.gamma_candidates):
            raise ValueError(
                f"gamma_candidates must be values in (0, 1], got {self.gamma_candidates}"
            )
        unknown = [m for m in self.methods if m not in METHOD_ABBREV]
        if unknown or not self.methods:
            raise ValueError(
                f"methods must be a non-empty subset of {ALL_METHODS}, got {self.methods}"
            )
        preset = PRESETS[self.dataset]
        for mod in self.perturbed or ():
            if mod not in preset.tables:
                raise ValueError(
                    f"{self.dataset} has no table for perturbed modality {mod!r}; "
                    f"valid: {', '.join(preset.tables)}"
                )
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")


def config_from_options(
    dataset: str = "avdigits",
    *,
    quick: bool = False,
    repeats: int | None = None,
    gamma: Sequence[float] | float | None = None,
    **options: Any,
) -> EvaluationConfig:
    """Build an :class:`EvaluationConfig` from CLI-style options.

    ``jacfusion-fed evaluate --dataset avdigits [--quick] [--repeats N] [--gamma G ...]`` maps
    here: one ``--gamma`` value fixes gamma for every Jacobian row; several values replace the
    candidate grid that gamma is selected from on the validation split; none keeps the paper's
    {0.1, 0.5, 0.9} with selection. Other keyword options are passed to the config unchanged.
    """
    if gamma is not None and not isinstance(gamma, (int, float)):
        values = tuple(float(g) for g in gamma)
        if len(values) == 1:
            gamma = values[0]
        elif values:
            options["gamma_candidates"] = values
            gamma = None
        else:
            gamma = None
    return EvaluationConfig(
        dataset=dataset,
        quick=quick,
        repeats=repeats,
        gamma=None if gamma is None else float(gamma),
        **options,
    )


@dataclass(frozen=True)
class ColumnSpec:
    """One table column: clean, a corruption, or an attack (setting 1 or adaptive)."""

    key: str
    kind: Literal["clean", "corruption", "attack", "adaptive"]
    corruption: Corruption | None = None
    attack: AttackSpec | None = None

    @property
    def label(self) -> str:
        if self.kind == "clean":
            return "Clean"
        if self.corruption is not None:
            return self.corruption.label
        assert self.attack is not None
        return self.attack.label + (" (adaptive)" if self.kind == "adaptive" else "")


@dataclass(frozen=True)
class SweepSpec:
    """A Figure 4 panel: one perturbation family over increasing sizes (``sizes[0]`` = 0 is
    the clean point)."""

    name: str
    parameter: str
    sizes: tuple[float, ...]

    def make(self, size: float) -> Corruption | AttackSpec:
        """The perturbation of this family at ``size``."""
        if self.name == "gaussian":
            return GaussianNoise(size)
        if self.name == "missing":
            return Missing(int(size))
        if self.name.startswith("bias"):
            # "bias:<w3>": a w2 x w2 patch with fixed w3 (sizes are w2)
            return BiasNoise(int(size), float(self.name.split(":")[1]))
        if self.name == "fgsm":
            return AttackSpec("fgsm", size)
        if self.name.startswith("pgd"):
            # "pgd:<w4>": PGD with fixed budget w4 (sizes are the step w5, 20 steps)
            return AttackSpec("pgd", float(self.name.split(":")[1]), size)
        raise ValueError(f"unknown sweep {self.name!r}")


@dataclass(frozen=True)
class TablePreset:
    """One paper-style table: which modality is perturbed, its columns and sweeps."""

    title: str
    perturbed: str
    clean: str
    columns: tuple[ColumnSpec, ...]
    sweeps: tuple[SweepSpec, ...] = ()
    quick_sweeps: tuple[SweepSpec, ...] = ()


@dataclass(frozen=True)
class DatasetPreset:
    """Per-dataset defaults: architectures and training settings per modality, tables."""

    name: str
    abbrev: dict[str, str]
    archs: dict[str, str]
    epochs: dict[str, int]
    quick_epochs: dict[str, int]
    tables: dict[str, TablePreset]
    lr: float = 1e-3
    batch_size: int = 64
    repeats: int = 5
    quick_repeats: int = 2
    method_params: dict[str, dict[str, float]] = field(default_factory=dict)
    derived: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Extra inputs made by concatenating modalities along the feature axis."""


def _attack_columns(w4: float, w5: float) -> tuple[ColumnSpec, ...]:
    fgsm, pgd = AttackSpec("fgsm", w4), AttackSpec("pgd", w4, w5, 20)
    return (
        ColumnSpec("fgsm", "attack", attack=fgsm),
        ColumnSpec("pgd", "attack", attack=pgd),
        ColumnSpec("fgsm_adaptive", "adaptive", attack=fgsm),
        ColumnSpec("pgd_adaptive", "adaptive", attack=pgd),
    )


_CLEAN = ColumnSpec("clean", "clean")

AVDIGITS = DatasetPreset(
    name="avdigits",
    abbrev={"image": "Img", "audio": "Aud"},
    archs={"image": "image_cnn", "audio": "spectrogram_cnn"},
    epochs={"image": 30, "audio": 30},
    quick_epochs={"image": 8, "audio": 8},
    tables={
        "audio": TablePreset(
            title="AV-Digits, audio perturbed (Table 1 analogue)",
            perturbed="audio",
            clean="image",
            columns=(
                _CLEAN,
                ColumnSpec("w0", "corruption", corruption=GaussianNoise(1.0)),
                ColumnSpec("w1", "corruption", corruption=Missing(8, "time")),
                *_attack_columns(0.03, 0.001),
            ),
            sweeps=(
                SweepSpec("gaussian", "w0", (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)),
                SweepSpec("missing", "w1", (0, 4, 8, 12, 16, 20)),
                SweepSpec("fgsm", "w4", (0.0, 0.01, 0.02, 0.03, 0.05, 0.07)),
                SweepSpec("pgd:0.07", "w5", (0.0, 0.0005, 0.001, 0.002, 0.003)),
            ),
            quick_sweeps=(
                SweepSpec("gaussian", "w0", (0.0, 1.0)),
                SweepSpec("fgsm", "w4", (0.0, 0.03)),
            ),
        ),
        "image": TablePreset(
            title="AV-Digits, image perturbed (Table 2 analogue)",
            perturbed="image",
            clean="audio",
            columns=(
                _CLEAN,
                ColumnSpec("w0", "corruption", corruption=GaussianNoise(2.5)),
                ColumnSpec("w23", "corruption", corruption=BiasNoise(3, 2.0)),
                *_attack_columns(0.07, 0.008),
            ),
            sweeps=(
                SweepSpec("gaussian", "w0", (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)),
                SweepSpec("bias:2.0", "w2", (0, 1, 2, 3, 4, 5)),
                SweepSpec("fgsm", "w4", (0.0, 0.02, 0.04, 0.07, 0.1, 0.15)),
                SweepSpec("pgd:0.15", "w5", (0.0, 0.002, 0.004, 0.008, 0.012)),
            ),
            quick_sweeps=(SweepSpec("gaussian", "w0", (0.0, 2.5)),),
        ),
    },
)

TWOMOON = DatasetPreset(
    name="twomoon",
    abbrev={"x": "X", "y": "Y", "xy": "XY"},
    archs={"x": "mlp", "y": "mlp", "xy": "mlp"},
    epochs={"x": 100, "y": 100, "xy": 100},
    quick_epochs={"x": 40, "y": 40, "xy": 40},
    lr=1e-2,
    derived={"xy": ("x", "y")},
    tables={
        "y": TablePreset(
            title="TwoMoon, Y coordinate perturbed",
            perturbed="y",
            clean="x",
            columns=(
                _CLEAN,
                ColumnSpec("w0", "corruption", corruption=GaussianNoise(0.5)),
                ColumnSpec("w1", "corruption", corruption=Missing(1)),
                *_attack_columns(0.1, 0.01),
            ),
            sweeps=(
                SweepSpec("gaussian", "w0", (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)),
                SweepSpec("fgsm", "w4", (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)),
                SweepSpec("pgd:0.3", "w5", (0.0, 0.0025, 0.005, 0.01, 0.015)),
            ),
            quick_sweeps=(SweepSpec("gaussian", "w0", (0.0, 0.5)),),
        ),
    },
)

PRESETS: dict[str, DatasetPreset] = {"avdigits": AVDIGITS, "twomoon": TWOMOON}
