"""Supplementary B.1 corruptions: shape, which entries change, magnitude, errors."""

from __future__ import annotations

import pytest
import torch

from jacfusion_fed.robustness import (
    BiasNoise,
    GaussianNoise,
    MissingEntries,
    bias_noise,
    gaussian_noise,
    missing_entries,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(64, 2, 12, 16, generator=_gen(1)) * 0.9 + 0.05  # strictly positive


# ----------------------------------------------------------------------------- Gaussian (w0)
def test_gaussian_noise_is_multiplicative_with_std_w0(images: torch.Tensor) -> None:
    out = gaussian_noise(images, 0.5, generator=_gen())
    assert out.shape == images.shape and out.dtype == images.dtype
    eps = out / images - 1.0  # x (1 + eps)  =>  eps = x_noisy / x - 1
    assert abs(float(eps.mean())) < 0.02
    assert abs(float(eps.std()) - 0.5) < 0.02


def test_gaussian_noise_keeps_zeros_and_is_reproducible() -> None:
    x = torch.zeros(4, 10)
    x[:, ::2] = 1.0
    a = gaussian_noise(x, 1.0, generator=_gen(3))
    b = gaussian_noise(x, 1.0, generator=_gen(3))
    assert torch.equal(a, b)
    assert torch.all(a[:, 1::2] == 0)
    assert not torch.equal(a, gaussian_noise(x, 1.0, generator=_gen(4)))


def test_gaussian_noise_zero_w0_is_identity_and_output_not_clipped(images: torch.Tensor) -> None:
    assert torch.equal(gaussian_noise(images, 0.0, generator=_gen()), images)
    out = gaussian_noise(images, 1.0, generator=_gen())
    assert float(out.max()) > 1.0 and float(out.min()) < 0.0  # documented: no clipping


# ----------------------------------------------------------------------------- missing (w1)
@pytest.mark.parametrize("axis", ["time", "frequency"])
def test_missing_entries_zeroes_w1_consecutive_lines_per_sample(
    images: torch.Tensor, axis: str
) -> None:
    w1 = 5
    out = missing_entries(images, w1, axis=axis, generator=_gen())  # type: ignore[arg-type]
    assert out.shape == images.shape
    changed = out != images
    assert torch.all(out[changed] == 0)
    dim = 3 if axis == "time" else 2
    other = 2 if axis == "time" else 3
    # a line (column for time, row for frequency) is either fully zeroed in every channel or intact
    zeroed_lines = changed.all(dim=other).all(dim=1)  # (N, L)
    touched_lines = changed.any(dim=other).any(dim=1)
    assert torch.equal(zeroed_lines, touched_lines)
    assert torch.all(zeroed_lines.sum(dim=1) == w1)
    for row in zeroed_lines:  # consecutive
        idx = torch.nonzero(row).flatten()
        assert int(idx[-1] - idx[0]) == w1 - 1
    assert images.shape[dim] == zeroed_lines.shape[1]
    starts = zeroed_lines.float().argmax(dim=1)
    assert len(set(starts.tolist())) > 1  # random position per sample


def test_missing_entries_on_vectors_and_full_width() -> None:
    x = torch.rand(8, 6) + 0.1
    out = missing_entries(x, 2, generator=_gen())
    assert torch.all((out == 0).sum(dim=1) == 2)
    assert torch.all(missing_entries(x, 6, generator=_gen()) == 0)
    assert torch.equal(missing_entries(x, 0, generator=_gen()), x)


# ----------------------------------------------------------------------------- bias (w2, w3)
def test_bias_noise_scales_one_square_patch(images: torch.Tensor) -> None:
    w2, w3 = 4, 2.0
    out = bias_noise(images, w2, w3, generator=_gen())
    assert out.shape == images.shape
    changed = ~torch.isclose(out, images)
    assert torch.allclose(out[changed], images[changed] * (1 + w3))
    per_sample = changed.any(dim=1)  # (N, H, W), same patch on every channel
    assert torch.equal(per_sample, changed.all(dim=1))
    for mask in per_sample:
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        assert len(rows) == w2 and len(cols) == w2
        assert int(mask.sum()) == w2 * w2  # a full square
    tops = per_sample.any(dim=2).float().argmax(dim=1)
    assert len(set(tops.tolist())) > 1


def test_bias_noise_minus_one_blacks_out_patch(images: torch.Tensor) -> None:
    out = bias_noise(images, 3, -1.0, generator=_gen())
    assert int((out == 0).sum()) == images.shape[0] * images.shape[1] * 9


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: gaussian_noise(x, -0.1), "w0"),
        (lambda x: gaussian_noise(x, float("nan")), "w0"),
        (lambda x: missing_entries(x, 17), "w1"),
        (lambda x: missing_entries(x, 13, axis="frequency"), "w1"),
        (lambda x: missing_entries(x, -1), "w1"),
        (lambda x: missing_entries(x, 2.5), "w1"),
        (lambda x: missing_entries(x, 2, axis="space"), "axis"),
        (lambda x: bias_noise(x, 13, 1.0), "w2"),
        (lambda x: bias_noise(x, 2, float("inf")), "w3"),
        (lambda x: gaussian_noise(x[0], 0.1), "rank"),
        (lambda x: bias_noise(x.flatten(1), 2, 1.0), "rank"),
        (lambda x: missing_entries(x.flatten(1), 2, axis="frequency"), "frequency"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(
    call, match: str, images: torch.Tensor
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call(images)


def test_corruption_objects_validate_and_label(images: torch.Tensor) -> None:
    assert GaussianNoise(1.0).label == "w0=1"
    assert MissingEntries(10).label == "w1=10"
    assert BiasNoise(10, 2).label == "w2,3=10,2"
    with pytest.raises(ValueError, match="w0"):
        GaussianNoise(-1.0)
    with pytest.raises(ValueError, match="w2"):
        BiasNoise(-3, 1.0)
    with pytest.raises(ValueError, match="w1"):
        MissingEntries(40).validate(images)
    noisy = GaussianNoise(0.2)(images, _gen(5))
    assert torch.equal(noisy, gaussian_noise(images, 0.2, generator=_gen(5)))
