"""Small numpy signal-processing helpers for the spoken-digit modality (no audio libraries)."""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

import numpy as np
from scipy.signal import resample_poly

__all__ = ["log_mel", "mel_filterbank", "mix_at_snr", "place", "prepare_clips"]


def prepare_clips(
    waves: Sequence[np.ndarray], sr_in: int, sr_out: int, rms: float = 0.1, chunk: int = 256
) -> list[np.ndarray]:
    """Resample to ``sr_out``, trim leading/trailing silence, normalize each RMS to ``rms``.

    Resampling runs on zero-padded chunks of clips at once (zeros beyond a clip's end are what
    ``resample_poly`` assumes anyway).
    """
    g = gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    out: list[np.ndarray] = []
    for start in range(0, len(waves), chunk):
        part = [np.asarray(w, dtype=np.float32) for w in waves[start : start + chunk]]
        width = max((len(w) for w in part), default=0)
        if width == 0 or any(len(w) == 0 for w in part):
            raise ValueError("cannot prepare an empty clip")
        block = np.zeros((len(part), width), dtype=np.float32)
        for i, w in enumerate(part):
            block[i, : len(w)] = w
        if up != down:
            block = resample_poly(block, up, down, axis=1).astype(np.float32)
        for i, w in enumerate(part):
            out.append(_trim_normalize(block[i, : -(-len(w) * up // down)], rms))
    return out


def _trim_normalize(x: np.ndarray, rms: float) -> np.ndarray:
    peak = float(np.max(np.abs(x)))
    if peak <= 0:
        raise ValueError("cannot prepare an all-silent clip")
    active = np.flatnonzero(np.abs(x) > 0.02 * peak)
    x = x[active[0] : active[-1] + 1].astype(np.float64)
    out: np.ndarray = (x * (rms / np.sqrt(np.mean(x**2)))).astype(np.float32)
    return out


def place(clip: np.ndarray, length: int, offset: int) -> np.ndarray:
    """Put ``clip`` into a zero signal of ``length`` samples starting at ``offset`` (cropping)."""
    out = np.zeros(length, dtype=np.float32)
    start, src = offset, 0
    if start < 0:
        src, start = -start, 0
    n = min(len(clip) - src, length - start)
    if n > 0:
        out[start : start + n] = clip[src : src + n]
    return out


def mix_at_snr(signal_power: float, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Scale ``noise`` so that ``10 log10(signal_power / noise power) == snr_db``."""
    power = float(np.mean(noise.astype(np.float64) ** 2))
    if power <= 0:
        return noise
    scale = np.sqrt(signal_power / (power * 10.0 ** (snr_db / 10.0)))
    out: np.ndarray = (noise * scale).astype(np.float32)
    return out


def mel_filterbank(
    sr: int, n_fft: int, n_mels: int, fmin: float = 60.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular HTK-mel filters, shape ``(n_mels, n_fft // 2 + 1)``, each summing to 1."""
    fmax = sr / 2 if fmax is None else fmax

    def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    fb: np.ndarray = np.clip(np.minimum(up, down), 0.0, None)
    fb /= np.maximum(fb.sum(axis=1, keepdims=True), 1e-12)
    return fb


def log_mel(
    waves: np.ndarray, sr: int, *, n_mels: int = 32, n_frames: int = 32, n_fft: int = 512
) -> np.ndarray:
    """Log-mel power spectrogram (dB) of equal-length waves ``(N, L)`` -> ``(N, mels, frames)``.

    Frames are Hann-windowed, ``n_fft`` long, with the hop chosen so that exactly ``n_frames``
    frames cover the signal.
    """
    waves = np.asarray(waves, dtype=np.float32)
    length = waves.shape[1]
    if length < n_fft:
        raise ValueError(f"waves of {length} samples are shorter than n_fft={n_fft}")
    hop = (length - n_fft) // max(n_frames - 1, 1)
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    frames = waves[:, idx] * np.hanning(n_fft).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # (N, T, F)
    mel = power @ mel_filterbank(sr, n_fft, n_mels).T.astype(np.float32)  # (N, T, M)
    return (10.0 * np.log10(mel + 1e-10)).transpose(0, 2, 1).astype(np.float32)
