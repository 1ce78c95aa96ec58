"""ctypes binding to libespeak-ng, runnable as a standalone worker script.

This file imports only the standard library so that it can run in a fresh interpreter
(``python -c "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')" THIS_FILE``)
without importing the package (and torch).

Why a fresh interpreter: libespeak-ng keeps process-global synthesis state between calls (pitch
flutter phase, oscillator phase), so the waveform of a clip depends on every clip synthesized
before it in the same process.  Synthesizing a fixed list of clips in a fresh process makes the
output a function of the list alone: bit-identical across runs in our measurements.

Protocol: one JSON object on stdin
``{"lib": path, "data": path, "seed": int, "clips": [[text, voice, pitch, rate], ...]}``;
on stdout one JSON header line ``{"sample_rate", "version", "lengths", "byteorder"}`` followed by
the int16 samples of all clips, concatenated.  Errors go to stderr with a non-zero exit status.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Sequence
from typing import Any

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakError(RuntimeError):
    """libespeak-ng refused a request (bad voice name, failed initialization, ...)."""


class EspeakLibrary:
    """Synchronous synthesis through libespeak-ng's C API (one instance per process)."""

    def __init__(self, lib_path: str, data_path: str) -> None:
        self._lib = ctypes.CDLL(lib_path)
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (data path {data_path!r})")
        self.sample_rate = int(rate)
        self.version = (lib.espeak_Info(None) or b"?").decode(errors="replace")
        self._chunks: list[bytes] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short], n: int, _events: int) -> int:
        if n > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    def synth(self, text: str, voice: str, pitch: int, rate: int, seed: int = 0) -> bytes:
        """Return the int16 samples (native byte order) of ``text`` spoken by ``voice``."""
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"eSpeak NG does not accept the voice name {voice!r}")
        lib.espeak_SetParameter(_RATE, int(rate), 0)
        lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        lib.espeak_SetParameter(_RANGE, 50, 0)
        if self._set_seed is not None:  # noise sources (whisper, croak, fricatives)
            self._set_seed(ctypes.c_long(seed))
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise EspeakError(f"espeak_Synth failed with code {err} for {text!r}")
        lib.espeak_Synchronize()
        return b"".join(self._chunks)

    def synth_many(self, clips: Sequence[Sequence[Any]], seed: int = 0) -> list[bytes]:
        """Synthesize ``(text, voice, pitch, rate)`` tuples in order (clip ``i`` gets seed
        ``seed + i`` for eSpeak's noise sources)."""
        return [
            self.synth(str(t), str(v), int(p), int(r), seed + i)
            for i, (t, v, p, r) in enumerate(clips)
        ]


def main() -> int:
    """Worker entry point: read a JSON request on stdin, write header + samples to stdout."""
    req = json.loads(sys.stdin.read())
    try:
        engine = EspeakLibrary(req["lib"], req["data"])
        out = engine.synth_many(req["clips"], int(req.get("seed", 0)))
    except EspeakError as exc:
        sys.stderr.write(f"{exc}\n")
        return 3
    header = {
        "sample_rate": engine.sample_rate,
        "version": engine.version,
        "lengths": [len(b) // 2 for b in out],
        "byteorder": sys.byteorder,
    }
    sys.stdout.buffer.write(json.dumps(header).encode() + b"\n")
    for chunk in out:
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
