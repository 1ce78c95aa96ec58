"""FGSM / PGD via torchattacks (setting 1) and the adaptive attack through the fused prediction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jacfusion_fed.fusion import factor_gram, gram_of, jacobian_fusion, statistical_fusion
from jacfusion_fed.robustness import (
    FGSM,
    PGD,
    AttackSpec,
    FusedLogProbs,
    FusionRule,
    attack_fused,
    worst_case_logits,
)

K = 3


def _blobs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K classes in [0, 1]^d, centres 0.1 apart per feature: separable, but not by 0.1 l_inf."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    centres = 0.35 + 0.15 * torch.arange(K, dtype=torch.float32)
    x = centres[y][:, None] + 0.03 * torch.randn(n, d, generator=g)
    return x.clamp(0, 1), y


def _train(x: torch.Tensor, y: torch.Tensor, seed: int = 0, steps: int = 300) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], 16), nn.ReLU(), nn.Linear(16, K))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def setup() -> dict[str, object]:
    xa, y = _blobs(300, 4, 0)
    xb, _ = _blobs(300, 4, 1)
    # the second modality carries the same labels, drawn independently
    g = torch.Generator().manual_seed(2)
    centres = 0.35 + 0.15 * torch.arange(K, dtype=torch.float32)
    xb = (centres[y][:, None] + 0.08 * torch.randn(300, 4, generator=g)).clamp(0, 1)
    return {"xa": xa, "xb": xb, "y": y, "net_a": _train(xa, y, 0), "net_b": _train(xb, y, 1)}


def test_fgsm_and_pgd_lower_accuracy_and_respect_budget(setup: dict) -> None:  # type: ignore[type-arg]
    net, x, y = setup["net_a"], setup["xa"], setup["y"]
    with torch.no_grad():
        clean = _acc(net(x), y)
    assert clean > 0.95
    x_f = FGSM(net, 0.1)(x, y)
    x_p = PGD(net, 0.1, 0.01, 20)(x, y, torch.Generator().manual_seed(0))
    for adv in (x_f, x_p):
        assert adv.shape == x.shape
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        acc_f, acc_p = _acc(net(x_f), y), _acc(net(x_p), y)
    assert acc_f < clean - 0.3
    assert acc_p <= acc_f + 0.02  # 20 PGD steps are at least as strong as one FGSM step


def test_fgsm_is_deterministic_and_pgd_reproducible_with_generator(setup: dict) -> None:  # type: ignore[type-arg]
    net, x, y = setup["net_a"], setup["xa"], setup["y"]
    assert torch.equal(FGSM(net, 0.05)(x, y), FGSM(net, 0.05)(x, y))
    pgd = PGD(net, 0.05, 0.01, 5)
    a = pgd(x, y, torch.Generator().manual_seed(1))
    b = pgd(x, y, torch.Generator().manual_seed(1))
    c = pgd(x, y, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not pgd.deterministic and PGD(net, 0.05, 0.01, random_start=False).deterministic


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda m: FGSM(m, -0.1), "w4"),
        (lambda m: PGD(m, 0.1, -0.01), "w5"),
        (lambda m: PGD(m, 0.1, 0.01, 0), "w6"),
        (lambda m: PGD(m, 0.1, 0.01, 2.5), "w6"),
        (lambda m: FGSM("not a model", 0.1), "model"),
        (lambda m: AttackSpec("cw", 0.1), "kind"),
        (lambda m: AttackSpec("pgd", float("nan"), 0.01), "w4"),
    ],
)
def test_bad_attack_parameters_raise(build, match: str, setup: dict) -> None:  # type: ignore[no-untyped-def, type-arg]
    with pytest.raises(ValueError, match=match):
        build(setup["net_a"])


def test_attack_refuses_inputs_outside_unit_range(setup: dict) -> None:  # type: ignore[type-arg]
    x, y = setup["xa"] * 2.0, setup["y"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FGSM(setup["net_a"], 0.1)(x, y)
    with pytest.raises(ValueError, match="y must have shape"):
        FGSM(setup["net_a"], 0.1)(setup["xa"], y[:5])


def _rule(setup: dict, gamma: float = 0.5) -> FusionRule:  # type: ignore[type-arg]
    factors = (None, factor_gram(gram_of(setup["net_b"][-1].weight.detach())))
    return FusionRule("jacobian", factors, None, gamma, (1,))


def test_fused_wrapper_outputs_log_of_the_fused_prediction(setup: dict) -> None:  # type: ignore[type-arg]
    net_a, net_b, xa, xb = setup["net_a"], setup["net_b"], setup["xa"], setup["xb"]
    with torch.no_grad():
        za, zb = net_a(xa), net_b(xb)
        rule = _rule(setup)
        wrapped = FusedLogProbs(net_b, [za, zb], 1, rule)(xb)
        gram = gram_of(net_b[-1].weight)
        expected = jacobian_fusion([za.double(), zb.double()], [None, gram], gamma=0.5)
        assert torch.allclose(wrapped.exp(), expected, atol=1e-10)
        stat = FusedLogProbs(net_b, [za, zb], 1, FusionRule("statistical"))(xb)
        assert torch.allclose(stat.exp(), statistical_fusion([za.double(), zb.double()]))
    with pytest.raises(ValueError, match="samples"):
        FusedLogProbs(net_b, [za, zb], 1, rule)(xb[:10])


def test_gradient_flows_through_the_jacobian_solve(setup: dict) -> None:  # type: ignore[type-arg]
    net_b = _train(setup["xb"], setup["y"], 1).double()
    za = setup["net_a"](setup["xa"][:6]).detach().double()
    zb = net_b(setup["xb"][:6].double()).detach()
    factors = (None, factor_gram(gram_of(net_b[-1].weight.detach())))
    module = FusedLogProbs(net_b, [za, zb], 1, FusionRule("jacobian", factors, None, 0.3, (1,)))
    x = setup["xb"][:6].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: module(t), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["statistical", "jacobian"])
def test_adaptive_attack_is_at_least_as_strong_as_per_modality_attack(
    setup: dict,  # type: ignore[type-arg]
    kind: str,
) -> None:
    """Same PGD budget. The pure end-to-end attack must hurt the fused prediction; combined per
    sample with the setting-1 attack (what an adaptive attacker does) it is at least as strong
    as either. Measured here: against Jacobian fusion the end-to-end attack alone is *weaker*
    than setting 1 (fused accuracy 0.86 vs 0.83), see robustness/adaptive.py."""
    net_a, net_b, xa, xb, y = (setup[k] for k in ("net_a", "net_b", "xa", "xb", "y"))
    with torch.no_grad():
        za, zb = net_a(xa), net_b(xb)
    rule = _rule(setup) if kind == "jacobian" else FusionRule("statistical")
    spec = AttackSpec("pgd", 0.12, 0.01, 20)
    with torch.no_grad():
        clean = _acc(rule([za, zb]), y)
    x1 = spec.build(net_b)(xb, y, torch.Generator().manual_seed(0))  # setting 1
    x2 = attack_fused(
        spec.build, net_b, xb, y, [za, zb], 1, rule, generator=torch.Generator().manual_seed(0)
    )
    assert float((x2 - xb).abs().max()) <= 0.12 + 1e-6
    with torch.no_grad():
        z1, z2 = net_b(x1), net_b(x2)
        acc1, acc2 = _acc(rule([za, z1]), y), _acc(rule([za, z2]), y)
        worst = worst_case_logits(rule, [za, zb], 1, [z2, z1], y)
        acc_adaptive = _acc(rule([za, worst]), y)
    assert acc1 < clean - 0.1
    assert acc2 < clean - 0.1
    assert acc_adaptive <= min(acc1, acc2)
