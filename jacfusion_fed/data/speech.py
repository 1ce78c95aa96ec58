"""Offline word synthesis with eSpeak NG (optional, GPL): library backend first, program second.

Backends, in the order ``backend="auto"`` tries them:

* ``"library"``: libespeak-ng bundled by the ``espeakng-loader`` wheel (``pip install
  'jacfusion-fed[speech]'``), driven through ctypes by :mod:`._espeak_worker` in one fresh helper
  interpreter per batch, so the output depends only on the batch (bit-reproducible).
* ``"library-inprocess"``: the same binding inside this process (no helper start-up; the
  waveform of a clip then depends slightly on what was synthesized before it in the process).
* ``"program"``: the ``espeak-ng`` executable (``apt-get install espeak-ng``), one process per
  clip, run in a thread pool.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from . import _espeak_worker
from ._espeak_worker import EspeakLibrary

__all__ = [
    "INSTALL_HINT",
    "Clip",
    "SpeechUnavailableError",
    "SynthesisResult",
    "Synthesizer",
    "get_synthesizer",
]

INSTALL_HINT = (
    "Install eSpeak NG with `pip install 'jacfusion-fed[speech]'` (bundles libespeak-ng via "
    "espeakng-loader) or `apt-get install espeak-ng` (the espeak-ng program)."
)
BACKENDS = ("auto", "library", "library-inprocess", "program")

Clip = tuple[str, str, int, int]
"""``(text, voice, pitch 0..99, rate in words per minute)``."""


class SpeechUnavailableError(RuntimeError):
    """No eSpeak NG backend could be found (or the requested one is missing)."""


class SpeechSynthesisError(RuntimeError):
    """eSpeak NG was found but failed on a request."""


@dataclass(frozen=True)
class SynthesisResult:
    """Synthesized clips as float32 waveforms in [-1, 1] at ``sample_rate``."""

    waves: list[np.ndarray]
    sample_rate: int
    backend: str
    version: str


class Synthesizer(Protocol):
    """Anything that turns a list of clips into waveforms."""

    name: str

    def synthesize(self, clips: Sequence[Clip], seed: int = 0) -> SynthesisResult: ...


def _loader_paths() -> tuple[str, str] | None:
    try:
        loader = importlib.import_module("espeakng_loader")
    except ImportError:
        return None
    lib, data = loader.get_library_path(), loader.get_data_path()
    return (str(lib), str(data)) if Path(lib).exists() else None


def _to_float(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.float32) / 32768.0).astype(np.float32)


class LibrarySynthesizer:
    """libespeak-ng from the ``espeakng-loader`` wheel, in a helper process or in process."""

    chunk_size = 400
    """Clips per helper process.  Fixed (not derived from the CPU count) so that the output,
    which depends on everything synthesized before a clip in its process, is the same on every
    machine; chunks run in parallel, one per CPU core."""
    timeout_s = 300.0

    def __init__(self, lib_path: str, data_path: str, *, isolate: bool = True) -> None:
        self.lib_path, self.data_path, self.isolate = lib_path, data_path, isolate
        self.name = "library" if isolate else "library-inprocess"

    def synthesize(self, clips: Sequence[Clip], seed: int = 0) -> SynthesisResult:
        if not self.isolate:
            return self._in_process(clips, seed)
        starts = list(range(0, len(clips), self.chunk_size))
        workers = max(1, min(len(starts), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(
                pool.map(
                    lambda s: self._run_worker(clips[s : s + self.chunk_size], seed + s), starts
                )
            )
        waves = [w for part, _, _ in parts for w in part]
        rate, version = (parts[0][1], parts[0][2]) if parts else (22050, "")
        return SynthesisResult(waves, rate, self.name, version)

    def _run_worker(self, clips: Sequence[Clip], seed: int) -> tuple[list[np.ndarray], int, str]:
        request = {
            "lib": self.lib_path,
            "data": self.data_path,
            "seed": seed,
            "clips": [list(c) for c in clips],
        }
        code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code, _espeak_worker.__file__],
                input=json.dumps(request).encode(),
                capture_output=True,
                check=False,
                timeout=self.timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise SpeechSynthesisError(f"eSpeak NG worker timed out after {exc.timeout}s") from exc
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip()
            raise SpeechSynthesisError(f"eSpeak NG worker failed ({proc.returncode}): {msg}")
        header_line, _, body = proc.stdout.partition(b"\n")
        header = json.loads(header_line)
        dtype = np.dtype("<i2" if header["byteorder"] == "little" else ">i2")
        samples = np.frombuffer(body, dtype=dtype)
        bounds = np.cumsum([0, *header["lengths"]])
        waves = [_to_float(samples[a:b]) for a, b in itertools.pairwise(bounds)]
        return waves, int(header["sample_rate"]), str(header["version"])

    def _in_process(self, clips: Sequence[Clip], seed: int) -> SynthesisResult:
        engine = _shared_engine(self.lib_path, self.data_path)
        with _ENGINE_LOCK:
            raw = engine.synth_many(list(clips), seed)
        waves = [_to_float(np.frombuffer(b, dtype=np.int16)) for b in raw]
        return SynthesisResult(waves, engine.sample_rate, self.name, engine.version)


_ENGINE_LOCK = threading.Lock()
_ENGINES: dict[tuple[str, str], EspeakLibrary] = {}


def _shared_engine(lib_path: str, data_path: str) -> EspeakLibrary:
    """One library instance per process (libespeak-ng has global state)."""
    with _ENGINE_LOCK:
        key = (lib_path, data_path)
        if key not in _ENGINES:
            _ENGINES[key] = EspeakLibrary(lib_path, data_path)
        return _ENGINES[key]


class ProgramSynthesizer:
    """The ``espeak-ng`` executable, one process per clip (byte-identical across runs)."""

    name = "program"

    def __init__(self, program: str) -> None:
        self.program = program

    def _one(self, clip: Clip, folder: str, index: int) -> tuple[np.ndarray, int]:
        text, voice, pitch, rate = clip
        out = os.path.join(folder, f"{index}.wav")
        cmd = [self.program, "-v", voice, "-p", str(pitch), "-s", str(rate), "-w", out, text]
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode != 0 or not os.path.exists(out):
            msg = proc.stderr.decode(errors="replace").strip()
            raise SpeechSynthesisError(f"{' '.join(cmd)} failed ({proc.returncode}): {msg}")
        with wave.open(out, "rb") as wf:
            if wf.getsampwidth() != 2:
                raise SpeechSynthesisError(f"{self.program} wrote {8 * wf.getsampwidth()}-bit WAV")
            raw = np.frombuffer(wf.readframes(wf.getnframes()), dtype="<i2")
            if wf.getnchannels() > 1:
                raw = raw.reshape(-1, wf.getnchannels())[:, 0]
            return _to_float(raw), wf.getframerate()

    def synthesize(self, clips: Sequence[Clip], seed: int = 0) -> SynthesisResult:
        del seed  # the program has no seed; its output is deterministic
        with tempfile.TemporaryDirectory(prefix="jacfusion-espeak-") as folder:
            workers = max(2, 2 * (os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(
                    pool.map(lambda ic: self._one(ic[1], folder, ic[0]), enumerate(clips))
                )
        rates = {sr for _, sr in results} or {22050}
        if len(rates) != 1:
            raise SpeechSynthesisError(f"{self.program} produced mixed sample rates {rates}")
        version = (
            subprocess.run([self.program, "--version"], capture_output=True, check=False)
            .stdout.decode(errors="replace")
            .strip()
        )
        return SynthesisResult([w for w, _ in results], rates.pop(), self.name, version)


def get_synthesizer(backend: str = "auto") -> Synthesizer:
    """Return the requested eSpeak NG backend (see the module docstring).

    ``backend`` defaults to ``$JACFUSION_SPEECH_BACKEND`` when that is set and ``backend`` is
    ``"auto"``.  Raises :class:`SpeechUnavailableError` (with install instructions) when no
    backend is available and ``ValueError`` for an unknown backend name.
    """
    if backend == "auto":
        backend = os.environ.get("JACFUSION_SPEECH_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown speech backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend in ("auto", "library", "library-inprocess"):
        paths = _loader_paths()
        if paths is not None:
            return LibrarySynthesizer(*paths, isolate=backend != "library-inprocess")
        if backend != "auto":
            raise SpeechUnavailableError(
                "the espeakng-loader package (libespeak-ng) is not installed. " + INSTALL_HINT
            )
    program = shutil.which("espeak-ng")
    if program is None:
        raise SpeechUnavailableError(
            "AV-Digits synthesizes its spoken digits with eSpeak NG, which was not found "
            "(neither the espeakng-loader package nor the espeak-ng program). " + INSTALL_HINT
        )
    return ProgramSynthesizer(program)
