"""Built-in datasets: TwoMoon and AV-Digits (generation, pairing, voices, determinism, cache)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers_wait import wait_until
from sklearn.datasets import load_digits

from jacfusion_fed.data import (
    SPLITS,
    MultimodalDataset,
    SpeechUnavailableError,
    avdigits_cache_path,
    generate_avdigits,
    load_builtin,
)
from jacfusion_fed.data import speech as speech_mod
from jacfusion_fed.data.avdigits import DIGIT_WORDS
from jacfusion_fed.data.cache import read_arrays

# Determinism tolerance for the audio features (values in [0, 1]).  Synthesis runs each fixed
# chunk of clips in a fresh helper process, which has been bit-identical in every run we made;
# the tolerance leaves room for the rare clip eSpeak NG renders slightly differently.
AUDIO_ATOL = 1e-6
AUDIO_MAX_DIFFERING_FRACTION = 0.02
AUDIO_MAX_MEAN_ABS_DIFF = 1e-3


def _speech_available() -> bool:
    try:
        speech_mod.get_synthesizer()
    except SpeechUnavailableError:
        return False
    return True


needs_speech = pytest.mark.skipif(not _speech_available(), reason="eSpeak NG not installed")


@pytest.fixture(scope="module")
def av_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared with tests/test_training.py (same session folder): AV-Digits quick is made once.
    return tmp_path_factory.getbasetemp() / "avdigits-quick-cache"


@pytest.fixture(scope="module")
def av_quick(av_cache: Path) -> dict[str, MultimodalDataset]:
    if not _speech_available():
        pytest.skip("eSpeak NG not installed")
    return {s: load_builtin("avdigits", s, quick=True, cache_dir=av_cache) for s in SPLITS}


def assert_audio_close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal within the stated determinism tolerance."""
    assert a.shape == b.shape
    per_sample = np.abs(a - b).reshape(len(a), -1).max(axis=1)
    assert np.mean(per_sample > AUDIO_ATOL) <= AUDIO_MAX_DIFFERING_FRACTION
    assert np.abs(a - b).mean() <= AUDIO_MAX_MEAN_ABS_DIFF


# ---------------------------------------------------------------- TwoMoon


def test_twomoon_shapes_ranges_balance() -> None:
    sizes = {}
    for split in SPLITS:
        ds = load_builtin("twomoon", split)
        n = len(ds)
        sizes[split] = n
        assert ds.modality_names == ["x", "y"]
        assert ds.modalities["x"].shape == (n, 1) and ds.modalities["y"].shape == (n, 1)
        assert ds.in_unit_range()
        assert 0.4 <= ds.class_counts()[0] / n <= 0.6
        assert ds.sample_ids[42] == f"twomoon-{split}-000042"
    train = load_builtin("twomoon", "train")
    assert train.modalities["x"].min() == 0 and train.modalities["x"].max() == 1
    assert sizes == {"train": 1000, "val": 200, "test": 400}
    assert len(load_builtin("twomoon", "train", quick=True)) < 1000


def test_twomoon_upper_moon_is_label_zero() -> None:
    ds = load_builtin("twomoon", "test")
    y = ds.modalities["y"][:, 0]
    assert y[ds.labels == 0].mean() > y[ds.labels == 1].mean()


def test_twomoon_determinism() -> None:
    a, b = load_builtin("twomoon", "test", seed=3), load_builtin("twomoon", "test", seed=3)
    c = load_builtin("twomoon", "test", seed=4)
    np.testing.assert_array_equal(a.modalities["x"], b.modalities["x"])
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.modalities["x"], c.modalities["x"])


@pytest.mark.parametrize("name", ["twomoon", "avdigits"])
def test_bad_name_and_split(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown built-in dataset 'mnist'.*twomoon.*avdigits"):
        load_builtin("mnist")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*train, val, test"):
        load_builtin(name, "dev", cache_dir=tmp_path)


# ---------------------------------------------------------------- AV-Digits


def test_avdigits_shapes_ranges_balance(av_quick: dict[str, MultimodalDataset]) -> None:
    for split, ds in av_quick.items():
        n = len(ds)
        assert ds.modality_names == ["image", "audio"]
        assert ds.modalities["image"].shape == (n, 1, 8, 8)
        assert ds.modalities["audio"].shape == (n, 1, 32, 32)
        assert all(v.dtype == np.float32 for v in ds.modalities.values())
        assert ds.in_unit_range()
        assert ds.modalities["audio"].std() > 0.05
        counts = ds.class_counts()
        assert counts.min() >= 0.8 * counts.max(), counts
        assert ds.sample_ids[7] == f"avdigits-{split}-000007"
        assert ds.class_names[7] == "seven"
    assert [len(av_quick[s]) for s in SPLITS] == [300, 100, 100]


def test_avdigits_pairs_by_label(av_quick: dict[str, MultimodalDataset]) -> None:
    target = load_digits().target
    seen: set[int] = set()
    for ds in av_quick.values():
        idx = ds.sample_meta["digit_index"]
        np.testing.assert_array_equal(target[idx], ds.labels)  # image label
        assert ds.sample_meta["word"].tolist() == [DIGIT_WORDS[k] for k in ds.labels]  # audio
        assert not seen & set(idx.tolist())  # each digit in one split only
        seen |= set(idx.tolist())


def test_avdigits_image_is_degraded(av_quick: dict[str, MultimodalDataset]) -> None:
    ds = av_quick["test"]
    assert ds.info["pca_energy_kept"] < 0.9
    original = load_digits().data[ds.sample_meta["digit_index"]].reshape(-1, 1, 8, 8) / 16.0
    assert np.abs(ds.modalities["image"] - original).mean() > 0.03


def test_avdigits_voice_variants_disjoint(av_quick: dict[str, MultimodalDataset]) -> None:
    used = {s: set(ds.sample_meta["variant"].tolist()) for s, ds in av_quick.items()}
    assert len(used["train"]) >= 8 and len(used["test"]) >= 4
    assert not used["train"] & used["test"]
    assert not used["train"] & used["val"]
    assert not used["val"] & used["test"]
    declared = av_quick["train"].info["voice_variants"]
    assert not set(declared["train"]) & set(declared["test"])
    assert all(v.split("+")[1] in declared["test"] for v in av_quick["test"].sample_meta["voice"])


@needs_speech
def test_avdigits_determinism(av_quick: dict[str, MultimodalDataset]) -> None:
    again = generate_avdigits(0, quick=True)
    other = generate_avdigits(1, quick=True)
    for split, ds in av_quick.items():
        np.testing.assert_array_equal(again[f"{split}.image"], ds.modalities["image"])
        np.testing.assert_array_equal(again[f"{split}.labels"], ds.labels)
        assert again[f"{split}.voice"].tolist() == ds.sample_meta["voice"].tolist()
        assert_audio_close(again[f"{split}.audio"], ds.modalities["audio"])
        # another seed: same digits and images, other clips and noise
        np.testing.assert_array_equal(other[f"{split}.image"], ds.modalities["image"])
        assert np.abs(other[f"{split}.audio"] - ds.modalities["audio"]).mean() > 0.05


def test_avdigits_cache_hit_is_fast_and_verified(
    av_quick: dict[str, MultimodalDataset], av_cache: Path
) -> None:
    first = av_quick["train"]
    assert av_quick["test"].info["cache_hit"] is True  # train was loaded first
    path = Path(first.info["cache_path"])
    assert path == avdigits_cache_path(0, quick=True, cache_dir=av_cache)
    assert read_arrays(path)  # the stored hash verifies
    hit = load_builtin("avdigits", "train", quick=True, cache_dir=av_cache)
    assert hit.info["cache_hit"] is True
    # generation_seconds is recorded when the arrays were generated (stored in the cache)
    assert hit.info["load_seconds"] < hit.info["generation_seconds"] / 5
    for m in first.modality_names:
        np.testing.assert_array_equal(hit.modalities[m], first.modalities[m])


def test_avdigits_corrupt_cache_is_regenerated(
    av_quick: dict[str, MultimodalDataset],
    av_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = avdigits_cache_path(0, quick=True, cache_dir=av_cache)
    dst = avdigits_cache_path(0, quick=True, cache_dir=tmp_path)
    dst.parent.mkdir(parents=True)
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte of the payload
    dst.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        ds = load_builtin("avdigits", "test", quick=True, cache_dir=tmp_path)
    assert ds.info["cache_hit"] is False
    assert "hash mismatch" in caplog.text
    assert read_arrays(dst)  # rewritten, verifies again
    assert_audio_close(ds.modalities["audio"], av_quick["test"].modalities["audio"])


def test_missing_synthesizer_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    av_quick: dict[str, MultimodalDataset],
    av_cache: Path,
) -> None:
    monkeypatch.setattr(speech_mod, "_loader_paths", lambda: None)
    monkeypatch.setattr(speech_mod.shutil, "which", lambda _name: None)
    hint = r"pip install 'jacfusion-fed\[speech\]'.*apt-get install espeak-ng"
    with pytest.raises(SpeechUnavailableError, match=hint):
        load_builtin("avdigits", "train", quick=True, cache_dir=tmp_path)
    # a cached dataset loads without any synthesizer
    src = avdigits_cache_path(0, quick=True, cache_dir=av_cache)
    dst = avdigits_cache_path(0, quick=True, cache_dir=tmp_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    assert len(load_builtin("avdigits", "val", quick=True, cache_dir=tmp_path)) == 100


def test_concurrent_loads_generate_once(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    av_quick: dict[str, MultimodalDataset],
    av_cache: Path,
) -> None:
    """Two owners starting together on a cold cache: one generates, the other waits and reads."""
    from jacfusion_fed.data import avdigits as av_mod

    stored = read_arrays(avdigits_cache_path(0, quick=True, cache_dir=av_cache))
    calls: list[int] = []
    at_lock: list[Path] = []
    real_lock = av_mod.file_lock

    @contextmanager
    def watched_lock(path: Path) -> Iterator[None]:
        at_lock.append(path)
        with real_lock(path):
            yield

    def slow_fake_generate(seed: int, **_kw: object) -> dict[str, np.ndarray]:
        calls.append(seed)
        # generating lasts until the other loader is at the lock: it must wait, then read
        wait_until(lambda: len(at_lock) == 2, "the second loader to reach the lock")
        return stored

    monkeypatch.setattr(av_mod, "file_lock", watched_lock)
    monkeypatch.setattr(av_mod, "generate_avdigits", slow_fake_generate)
    with ThreadPoolExecutor(max_workers=2) as pool:
        loaded = list(
            pool.map(
                lambda s: load_builtin("avdigits", s, quick=True, cache_dir=tmp_path),
                ["train", "test"],
            )
        )
    assert calls == [0]
    assert sorted(d.info["cache_hit"] for d in loaded) == [False, True]
