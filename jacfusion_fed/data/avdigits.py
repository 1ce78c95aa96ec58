"""AV-Digits: an offline AV-MNIST analogue (PCA-degraded digit images + noisy spoken digits).

* ``"image"``: scikit-learn's 1,797 8x8 digits, reconstructed from a few principal components
  (PCA fitted on train) so that images alone are imperfect; ``(N, 1, 8, 8)`` in [0, 1].
* ``"audio"``: "zero".."nine" synthesized with eSpeak NG in many voices (accent x variant), pitches
  and rates, then mixed with babble (other words, same split's voices) and white noise at random
  SNRs; log-mel spectrograms ``(N, 1, n_mels, n_frames)`` in [0, 1] (rows = mel bands, columns
  = time frames), scaling fitted on train.  Voice *variants* are disjoint between splits.
* Pairing as in AV-MNIST: every image sample gets a clip of the same label from the same split.

The digits split (60/20/20, stratified) is fixed; ``seed`` drives everything random in the audio
(voice parameters, clip choice, offsets, noise).  Generation takes seconds; the arrays of all
three splits are cached under a content hash of the parameters (see :mod:`.cache`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from .audio import log_mel, mix_at_snr, place, prepare_clips
from .cache import (
    CacheCorruptError,
    content_key,
    default_cache_dir,
    file_lock,
    read_arrays,
    write_arrays,
)
from .dataset import MultimodalDataset
from .speech import get_synthesizer

__all__ = [
    "ACCENTS",
    "DIGIT_WORDS",
    "FILLER_WORDS",
    "GENERATOR_VERSION",
    "SPLITS",
    "VOICE_VARIANTS",
    "AVDigitsConfig",
    "avdigits_cache_path",
    "generate_avdigits",
    "make_avdigits",
]

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPLIT_SEED = 20240917  # fixed digits split, independent of ``seed``
_SPLIT_FRACTIONS = (0.6, 0.2)  # train, val; the rest is test
_QUICK_PER_CLASS = {"train": 30, "val": 10, "test": 10}
_log = logging.getLogger(__name__)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ACCENTS = _words("en en-us en-gb-scotland en-029 en-gb-x-rp en-us-nyc")
"""eSpeak NG English voices; every split uses all of them."""
VOICE_VARIANTS: dict[str, tuple[str, ...]] = {
    "train": _words(
        "m1 m2 m3 m4 f1 f2 f3 klatt klatt2 adam benjamin caleb david linda max paul Andy boris ed "
        "iven quincy rob travis victor"
    ),
    "val": _words("m5 f4 klatt3 edward michel aunty"),
    "test": _words("m6 m7 m8 f5 klatt4 john robert norbert"),
}
"""Voice variants (``<accent>+<variant>``), disjoint between the splits."""
FILLER_WORDS = _words(
    "apple river table house green music paper window yellow garden happy little morning water "
    "people summer"
)
"""Non-digit words whose clips make the babble noise."""


@dataclass(frozen=True)
class AVDigitsConfig:
    """Generation parameters (all of them enter the cache key)."""

    pca_components: int = 4
    sample_rate: int = 11025
    clip_seconds: float = 0.8
    n_mels: int = 32
    n_frames: int = 32
    n_fft: int = 512
    snr_db: tuple[float, float] = (8.0, 20.0)
    babble_snr_db: tuple[float, float] = (3.0, 15.0)
    babble_words: tuple[int, int] = (2, 4)
    gain_db: tuple[float, float] = (-6.0, 6.0)
    pitches: tuple[int, ...] = (30, 40, 50, 60, 70)
    rates: tuple[int, ...] = (130, 150, 170, 190, 210)
    accents: tuple[str, ...] = ACCENTS
    variants: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(VOICE_VARIANTS))
    fillers: tuple[str, ...] = FILLER_WORDS
    filler_clips_per_word: int = 8

    def __post_init__(self) -> None:
        splits = set(self.variants)
        if splits != set(SPLITS):
            raise ValueError(f"variants must be given for exactly {SPLITS}, got {sorted(splits)}")
        seen: dict[str, str] = {}
        for split, names in self.variants.items():
            for v in names:
                if v in seen and seen[v] != split:
                    raise ValueError(f"voice variant {v!r} is in both {seen[v]} and {split}")
                seen[v] = split


def _digits_split() -> dict[str, np.ndarray]:
    """Fixed stratified 60/20/20 split of the 1,797 digits (indices into ``load_digits``)."""
    target = load_digits().target
    rng = np.random.default_rng(_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(target == c))
        n_tr = round(_SPLIT_FRACTIONS[0] * len(idx))
        n_va = round(_SPLIT_FRACTIONS[1] * len(idx))
        for s, chunk in zip(SPLITS, np.split(idx, [n_tr, n_tr + n_va]), strict=True):
            parts[s].append(chunk)
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def _quick_subset(indices: np.ndarray, target: np.ndarray, per_class: int) -> np.ndarray:
    keep = [indices[target[indices] == c][:per_class] for c in range(10)]
    return np.sort(np.concatenate(keep))


def _images(
    split_idx: dict[str, np.ndarray], cfg: AVDigitsConfig
) -> tuple[dict[str, np.ndarray], float]:
    """PCA-degraded images per split (PCA fitted on the full train split) and energy kept."""
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    pca = PCA(n_components=cfg.pca_components, svd_solver="full").fit(x[_digits_split()["train"]])
    out = {}
    for s, idx in split_idx.items():
        rec = pca.inverse_transform(pca.transform(x[idx]))
        out[s] = np.clip(rec, 0.0, 1.0).reshape(-1, 1, 8, 8).astype(np.float32)
    return out, float(pca.explained_variance_ratio_.sum())


def _clip_pool(
    cfg: AVDigitsConfig, rng: np.random.Generator, quick: bool
) -> tuple[list[tuple[str, str, int, int]], list[dict[str, Any]]]:
    """Every clean (word, voice, pitch, rate) clip to synthesize once, with its metadata.

    One clip per (digit, accent, split variant) with a random pitch and rate, plus
    ``filler_clips_per_word`` babble clips per filler word; ``quick`` halves both (the first
    half of the accents, half the filler clips).
    """
    accents = cfg.accents[: max(1, len(cfg.accents) // 2)] if quick else cfg.accents
    n_fill = max(1, cfg.filler_clips_per_word // 2) if quick else cfg.filler_clips_per_word
    clips: list[tuple[str, str, int, int]] = []
    meta: list[dict[str, Any]] = []

    def add(split: str, label: int, word: str, accent: str, variant: str) -> None:
        pitch, rate = int(rng.choice(cfg.pitches)), int(rng.choice(cfg.rates))
        clips.append((word, f"{accent}+{variant}", pitch, rate))
        meta.append(
            dict(split=split, label=label, accent=accent, variant=variant, pitch=pitch, rate=rate)
        )

    for split in SPLITS:
        variants = cfg.variants[split]
        for label, word in enumerate(DIGIT_WORDS):
            for accent in accents:
                for variant in variants:
                    add(split, label, word, accent, variant)
        for word in cfg.fillers:
            for _ in range(n_fill):
                accent, variant = str(rng.choice(accents)), str(rng.choice(variants))
                add(split, -1, word, accent, variant)
    return clips, meta


def _noisy_waves(
    labels: np.ndarray,
    split: str,
    clean: list[np.ndarray],
    meta: list[dict[str, Any]],
    cfg: AVDigitsConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One noisy clip per label: a same-label clean clip + babble + white noise."""
    length = round(cfg.sample_rate * cfg.clip_seconds)
    by_label = {
        c: [i for i, m in enumerate(meta) if m["split"] == split and m["label"] == c]
        for c in range(10)
    }
    fillers = [i for i, m in enumerate(meta) if m["split"] == split and m["label"] < 0]
    waves = np.zeros((len(labels), length), dtype=np.float32)
    chosen = np.zeros(len(labels), dtype=np.int64)
    snr = np.zeros(len(labels), dtype=np.float32)
    bsnr = np.zeros(len(labels), dtype=np.float32)
    for n, label in enumerate(labels):
        j = int(rng.choice(by_label[int(label)]))
        clip = clean[j]
        slack = length - len(clip)
        target = place(clip, length, int(rng.integers(min(0, slack), max(0, slack) + 1)))
        power = float(np.mean(clip.astype(np.float64) ** 2))
        babble = np.zeros(length, dtype=np.float32)
        for _ in range(int(rng.integers(cfg.babble_words[0], cfg.babble_words[1] + 1))):
            f = clean[int(rng.choice(fillers))]
            off = int(rng.integers(-len(f) // 2, length - len(f) // 2))
            babble += float(rng.uniform(0.5, 1.0)) * place(f, length, off)
        bsnr[n] = rng.uniform(*cfg.babble_snr_db)
        snr[n] = rng.uniform(*cfg.snr_db)
        white = rng.standard_normal(length).astype(np.float32)
        gain = 10.0 ** (rng.uniform(*cfg.gain_db) / 20.0)
        waves[n] = gain * (
            target + mix_at_snr(power, babble, bsnr[n]) + mix_at_snr(power, white, snr[n])
        )
        chosen[n] = j
    pick = [meta[j] for j in chosen]
    info = {
        "word": np.array([DIGIT_WORDS[m["label"]] for m in pick]),
        "accent": np.array([m["accent"] for m in pick]),
        "variant": np.array([m["variant"] for m in pick]),
        "voice": np.array([f"{m['accent']}+{m['variant']}" for m in pick]),
        "pitch": np.array([m["pitch"] for m in pick], dtype=np.int64),
        "rate": np.array([m["rate"] for m in pick], dtype=np.int64),
        "snr_db": snr,
        "babble_snr_db": bsnr,
        "clip_index": chosen,
    }
    return waves, info


def generate_avdigits(
    seed: int = 0,
    *,
    quick: bool = False,
    config: AVDigitsConfig | None = None,
    backend: str = "auto",
) -> dict[str, np.ndarray]:
    """Generate all three splits; returns flat arrays keyed ``"<split>.<field>"`` plus ``"meta"``.

    Fields per split: ``image``, ``audio``, ``labels``, ``digit_index`` (into ``load_digits``)
    and the per-sample audio metadata (``word``, ``voice``, ``variant``, ``accent``, ``pitch``,
    ``rate``, ``snr_db``, ``babble_snr_db``, ``clip_index``).  ``"meta"`` is a JSON string.
    """
    cfg = config or AVDigitsConfig()
    t0 = time.perf_counter()
    target = load_digits().target
    split_idx = _digits_split()
    if quick:
        split_idx = {s: _quick_subset(i, target, _QUICK_PER_CLASS[s]) for s, i in split_idx.items()}
    images, energy = _images(split_idx, cfg)

    rng = np.random.default_rng([seed, 0xA0D1])
    clips, meta = _clip_pool(cfg, rng, quick)
    synth = get_synthesizer(backend)
    result = synth.synthesize(clips, seed=seed)
    clean = prepare_clips(result.waves, result.sample_rate, cfg.sample_rate)
    t_synth = time.perf_counter() - t0

    out: dict[str, np.ndarray] = {}
    feats: dict[str, np.ndarray] = {}
    for split in SPLITS:
        labels = target[split_idx[split]].astype(np.int64)
        waves, info = _noisy_waves(labels, split, clean, meta, cfg, rng)
        feats[split] = log_mel(
            waves, cfg.sample_rate, n_mels=cfg.n_mels, n_frames=cfg.n_frames, n_fft=cfg.n_fft
        )
        out[f"{split}.image"] = images[split]
        out[f"{split}.labels"] = labels
        out[f"{split}.digit_index"] = split_idx[split].astype(np.int64)
        out.update({f"{split}.{k}": v for k, v in info.items()})
    lo, hi = np.percentile(feats["train"], [1.0, 99.9])
    for split in SPLITS:
        scaled = np.clip((feats[split] - lo) / (hi - lo), 0.0, 1.0)
        out[f"{split}.audio"] = scaled[:, None].astype(np.float32)
    meta_info = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "quick": quick,
        "config": asdict(cfg),
        "pca_energy_kept": energy,
        "audio_db_range": [float(lo), float(hi)],
        "speech_backend": result.backend,
        "espeak_version": result.version,
        "clean_clips": len(clips),
        "synthesis_seconds": t_synth,
        "generation_seconds": time.perf_counter() - t0,
        "voice_variants": {s: list(cfg.variants[s]) for s in SPLITS},
    }
    out["meta"] = np.array(json.dumps(meta_info))
    return out


def avdigits_cache_path(
    seed: int = 0,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    config: AVDigitsConfig | None = None,
) -> Path:
    """Where the arrays for these parameters are cached (the name holds their content hash)."""
    cfg = config or AVDigitsConfig()
    key = content_key(
        {
            "dataset": "avdigits",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "quick": quick,
            "config": asdict(cfg),
        }
    )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "datasets" / f"avdigits-v{GENERATOR_VERSION}-{key[:32]}.jfcache"


def _try_read(path: Path) -> dict[str, np.ndarray] | None:
    try:
        return read_arrays(path)
    except FileNotFoundError:
        return None
    except CacheCorruptError as exc:
        _log.warning("regenerating AV-Digits: %s", exc)
        return None


def _load_or_generate(
    seed: int, quick: bool, cache_dir: Path | None, config: AVDigitsConfig | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = avdigits_cache_path(seed, quick=quick, cache_dir=cache_dir, config=config)
    t0 = time.perf_counter()
    arrays = _try_read(path)
    hit = arrays is not None
    if arrays is None:
        # One process generates; others started at the same time wait and then read its file.
        with file_lock(path):
            arrays = _try_read(path)
            hit = arrays is not None
            if arrays is None:
                arrays = generate_avdigits(seed, quick=quick, config=config)
                try:
                    write_arrays(path, arrays)
                except OSError as exc:
                    _log.warning("could not cache AV-Digits at %s: %s", path, exc)
    info = {"cache_hit": hit, "cache_path": str(path), "load_seconds": time.perf_counter() - t0}
    return arrays, info


def make_avdigits(
    split: str,
    seed: int = 0,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    config: AVDigitsConfig | None = None,
) -> MultimodalDataset:
    """One split of AV-Digits (cached; see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    arrays, cache_info = _load_or_generate(seed, quick, cache_dir, config)
    meta = json.loads(str(arrays["meta"]))
    labels = arrays[f"{split}.labels"]
    sample_meta = {
        k.split(".", 1)[1]: v
        for k, v in arrays.items()
        if k.startswith(f"{split}.") and k.split(".", 1)[1] not in ("image", "audio", "labels")
    }
    return MultimodalDataset(
        modalities={"image": arrays[f"{split}.image"], "audio": arrays[f"{split}.audio"]},
        labels=labels,
        sample_ids=[f"avdigits-{split}-{i:06d}" for i in range(len(labels))],
        num_classes=10,
        class_names=list(DIGIT_WORDS),
        name="avdigits",
        sample_meta=sample_meta,
        info={**meta, **cache_info, "split": split},
    )
