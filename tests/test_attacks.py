"""The perturbation steps of attacks.py: budgets, projection, ascent direction, PGD (docs/method.md §4.3, §6)."""
import math
import re
from pathlib import Path

import pytest
import torch

import attacks


def test_radius_cifar10_and_imagenet64():
    """eta = 0.1 gives the released code's l2 radius r = eta sqrt(d) for CIFAR-10 and ImageNet-64.

    Closed form: 0.1 * sqrt(3072) = 3.2 sqrt(3) = 5.5425625842 and 0.1 * sqrt(12288) = 6.4 sqrt(3) = 11.0851251684.
    """
    assert attacks.l2_radius(0.1, 3 * 32 * 32) == pytest.approx(5.5425625842, rel=1e-10)
    assert attacks.l2_radius(0.1, 3 * 64 * 64) == pytest.approx(11.0851251684, rel=1e-10)


def test_step_length_scales():
    """`abs` keeps alpha, `sqrt_d` multiplies by sqrt(d); anything else is refused."""
    assert attacks.step_length(0.1, 3072, "abs") == 0.1
    assert attacks.step_length(0.1, 3072, "sqrt_d") == pytest.approx(0.1 * math.sqrt(3072))
    with pytest.raises(ValueError):
        attacks.step_length(0.1, 3072, "cube")


def test_l2_step_is_normalised_gradient():
    """Inside the ball an l2 step moves delta by exactly alpha along g/||g||, per sample, whatever ||g||."""
    delta = torch.zeros(2, 3, 4, 4)
    grad = torch.randn(2, 3, 4, 4)
    grad[1] *= 1000.0
    out = attacks.l2_step(delta, grad, 0.1, radius=5.0)
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([0.1, 0.1]), rtol=1e-6)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), grad.flatten(1))
    assert torch.allclose(cos, torch.ones(2), atol=1e-6)


def test_l2_projection_binds():
    """A step that would leave the ball lands on its boundary (norm = r), pointing the same way."""
    delta = torch.zeros(3, 10)
    grad = torch.randn(3, 10)
    out = attacks.l2_step(delta, grad, 5.0, radius=torch.tensor([1.0, 2.0, 3.0]).view(3, 1))
    assert torch.allclose(out.norm(dim=1), torch.tensor([1.0, 2.0, 3.0]), rtol=1e-6)


def test_l2_no_projection_when_budget_nonpositive():
    """radius <= 0 skips the projection, as the released code does for eta <= 0."""
    out = attacks.l2_step(torch.zeros(1, 4), torch.ones(1, 4), 3.0, radius=0.0)
    assert out.norm().item() == pytest.approx(3.0)


def test_ball_of_the_released_recipe():
    """The trainers' ball: eta = alpha = 0.1 at d = 3072 gives radius 0.1 * sqrt(3072) = 5.5425625842 with the
    released absolute step 0.1 (docs/method.md §4.3), or the step 5.5425625842 with sqrt_d; l-inf takes eta, alpha."""
    assert attacks.ball("l2", 0.1, 0.1, 3072) == pytest.approx((5.5425625842, 0.1))
    assert attacks.ball("l2", 0.1, 0.1, 3072, "sqrt_d") == pytest.approx((5.5425625842, 5.5425625842))
    assert attacks.ball("linf", 0.03, 0.01, 3072) == (0.03, 0.01)
    with pytest.raises(ValueError):
        attacks.ball("l1", 0.1, 0.1, 3072)


def test_zero_gradient_is_safe():
    """A zero gradient gives a zero step, not NaN (the released code's 1e-8 clamp, docs/method.md §4.3)."""
    out = attacks.l2_step(torch.zeros(2, 5), torch.zeros(2, 5), 0.1, radius=1.0)
    assert torch.equal(out, torch.zeros(2, 5))


def test_linf_step_sign_and_clamp():
    """The l-inf step adds alpha*sign(g) per coordinate and clamps to [-r, r]."""
    delta = torch.tensor([[0.05, -0.05, 0.0]])
    grad = torch.tensor([[1.0, 2.0, -3.0]])
    out = attacks.linf_step(delta, grad, 0.1, 0.1)
    assert torch.allclose(out, torch.tensor([[0.1, 0.05, -0.1]]))
    # a non-positive radius means no projection, as for l2 (the released code's eta <= 0)
    assert torch.allclose(attacks.linf_step(delta, grad, 0.1, 0.0), torch.tensor([[0.15, 0.05, -0.1]]))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_ball_and_raises_loss(norm):
    """PGD keeps delta in its ball and does not lower a convex loss (a maximiser of distance to a point)."""
    torch.manual_seed(0)
    target = torch.randn(4, 3, 8, 8)
    x = torch.randn(4, 3, 8, 8)

    def loss_fn(z):
        return ((z - target) ** 2).flatten(1).sum(1)

    radius = attacks.l2_radius(0.1, 192) if norm == "l2" else 0.1
    delta = attacks.pgd(loss_fn, x, radius, n_steps=5, norm=norm)
    if norm == "l2":
        assert (delta.flatten(1).norm(dim=1) <= radius * (1 + 1e-6)).all()
        # the exact maximiser of ||x + delta - target|| on the ball is r in the direction of x - target
        best = loss_fn(x + radius * (x - target) / (x - target).flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        assert torch.allclose(loss_fn(x + delta), best, rtol=1e-4)
    else:
        assert delta.abs().max() <= 0.1 + 1e-7
    assert (loss_fn(x + delta) >= loss_fn(x)).all()


def test_random_perturbation_on_sphere():
    """The random baseline has norm exactly r and is seeded."""
    x = torch.zeros(5, 3, 4, 4)
    a = attacks.random_perturbation(x, 2.0, torch.Generator().manual_seed(3))
    b = attacks.random_perturbation(x, 2.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.allclose(a.flatten(1).norm(dim=1), torch.full((5,), 2.0), rtol=1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_random_start_is_seeded_and_in_ball(norm):
    """With random_start, PGD starts on the l2 sphere (Madry et al. 2018's random start) or in the l-inf box, is
    reproducible under a seeded generator and ends inside its ball."""
    x = torch.zeros(3, 2, 4, 4)

    def loss_fn(z):
        return z.flatten(1).sin().sum(1)

    radius = 0.5
    runs = [attacks.pgd(loss_fn, x, radius, n_steps=2, norm=norm, generator=torch.Generator().manual_seed(1),
                        random_start=True) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    size = runs[0].flatten(1).norm(dim=1) if norm == "l2" else runs[0].abs().flatten(1).amax(dim=1)
    assert (size <= radius * (1 + 1e-6)).all()


def test_attacks_never_updates_weights():
    """attacks.py is perturbation math only: no optimizer, no backward, no EMA; the trainers own the weight update."""
    source = Path(attacks.__file__).read_text()
    for pattern in (r"backward", r"torch\.optim", r"\.step\(", r"zero_grad", r"\bema\b"):
        assert not re.search(pattern, source, re.IGNORECASE), pattern
