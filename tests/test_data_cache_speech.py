"""The hash-verified cache and the eSpeak NG backends."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from jacfusion_fed.data import speech as speech_mod
from jacfusion_fed.data.audio import log_mel, prepare_clips
from jacfusion_fed.data.cache import CacheCorruptError, content_key, read_arrays, write_arrays
from jacfusion_fed.data.speech import (
    SpeechSynthesisError,
    SpeechUnavailableError,
    get_synthesizer,
)


def test_cache_round_trip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.jfcache"
    arrays = {"x": np.arange(6.0).reshape(2, 3), "s": np.array(["a", "bc"]), "m": np.array("{}")}
    digest = write_arrays(path, arrays)
    assert len(digest) == 64 and not list(path.parent.glob(".*.tmp"))
    back = read_arrays(path)
    np.testing.assert_array_equal(back["x"], arrays["x"])
    assert back["s"].tolist() == ["a", "bc"] and str(back["m"]) == "{}"

    data = path.read_bytes()
    path.write_bytes(data[:-10])  # truncated
    with pytest.raises(CacheCorruptError, match="hash mismatch"):
        read_arrays(path)
    path.write_bytes(b"garbage" + data)
    with pytest.raises(CacheCorruptError, match="bad header"):
        read_arrays(path)
    with pytest.raises(FileNotFoundError):
        read_arrays(tmp_path / "missing.jfcache")


def test_content_key_is_canonical() -> None:
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_log_mel_shape_and_tone_position() -> None:
    sr = 11025
    t = np.arange(8820) / sr
    low, high = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 3000 * t)
    feats = log_mel(np.stack([low, high]), sr, n_mels=32, n_frames=32)
    assert feats.shape == (2, 32, 32)
    assert feats[0].mean(axis=1).argmax() < feats[1].mean(axis=1).argmax()
    clips = prepare_clips([np.r_[np.zeros(100), low, np.zeros(50)]], 22050, sr, rms=0.1)
    assert abs(np.sqrt(np.mean(clips[0] ** 2)) - 0.1) < 1e-4
    assert len(clips[0]) <= len(low) // 2 + 2  # resampled by 1/2, silence trimmed


_FAKE_PROGRAM = """#!{python}
import math, struct, sys, wave
args = sys.argv[1:]
if "--version" in args:
    print("eSpeak NG text-to-speech: fake"); sys.exit(0)
out = args[args.index("-w") + 1]
pitch = int(args[args.index("-p") + 1])
n = 22050 // 4
with wave.open(out, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(22050)
    w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(0.05 * pitch * i)))
                  for i in range(n)))
"""


def test_program_backend_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prog = tmp_path / "espeak-ng"
    prog.write_text(_FAKE_PROGRAM.format(python=sys.executable))
    prog.chmod(0o755)
    monkeypatch.setattr(speech_mod, "_loader_paths", lambda: None)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    synth = get_synthesizer()
    assert synth.name == "program"
    res = synth.synthesize([("one", "en+m1", 40, 150), ("two", "en+f2", 60, 170)])
    assert res.sample_rate == 22050 and res.version.endswith("fake")
    assert [len(w) for w in res.waves] == [22050 // 4] * 2
    assert not np.array_equal(res.waves[0], res.waves[1])
    with pytest.raises(SpeechUnavailableError, match="espeakng-loader"):
        get_synthesizer("library")


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown speech backend 'festival'"):
        get_synthesizer("festival")


needs_library = pytest.mark.skipif(
    speech_mod._loader_paths() is None, reason="espeakng-loader not installed"
)


@needs_library
def test_library_backend_is_reproducible_and_rejects_bad_voices() -> None:
    synth = get_synthesizer("library")
    clips = [
        ("seven", "en-us+f2", 50, 170),
        ("three", "en+m3", 40, 140),
        ("seven", "en+m1", 60, 200),
    ]
    a, b = synth.synthesize(clips), synth.synthesize(clips)
    assert a.sample_rate == 22050 and a.backend == "library"
    assert all(len(w) > 0.2 * a.sample_rate for w in a.waves)
    assert all(np.array_equal(x, y) for x, y in zip(a.waves, b.waves, strict=True))
    with pytest.raises(SpeechSynthesisError, match="no-such-voice"):
        synth.synthesize([("one", "no-such-voice", 50, 170)])


@needs_library
def test_library_in_process_backend() -> None:
    res = get_synthesizer("library-inprocess").synthesize([("nine", "en+m2", 50, 170)])
    assert res.backend == "library-inprocess" and len(res.waves[0]) > 1000
    assert np.abs(res.waves[0]).max() <= 1.0
