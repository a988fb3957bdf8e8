"""Perturbations of the noisy input x_t: the inner maximisation of adversarial training (AT), and PGD for evaluation.

Paper: Wang et al. 2025, arXiv:2502.17099v1; the AT objective min_theta E max_{delta in Ball} loss(x_t + delta)
       (Eq. (14) in the OpenReview reviews' numbering; docs/method.md §4.1, §4.3).
Borrowed: normalised-gradient l2 ascent + projection = l2-PGD (Madry et al. 2018, Sec. 2), sign step = FGSM
          (Goodfellow et al. 2015); the ball radius eta*sqrt(d) and the absolute step follow the authors' released
          code (cifar_adv_train.sh and its training loop).
Uses: nothing from this repo.     Used by: dpm_at.py, cm_at.py, experiments/robustness.py.
Run: python attacks.py            (prints a tiny demo; full checks in tests/test_attacks.py)

This file knows nothing about diffusion and never updates weights. The trainers (dpm_at.py, cm_at.py) run the
free-AT loop themselves, weight update included, and hand delta's gradient to `l2_step` / `linf_step`; `pgd`
takes a loss closure loss_fn(x) -> (B,) that hides what the model is.

Symbols: perturbation -> delta, budget eta (RMS per coordinate) -> adv_budget, l2 radius -> radius,
         step size alpha -> step_size, number of ascent steps -> n_steps, d = elements per sample.
Shapes: delta, grad are (B, ...) with any number of non-batch dims; radius / step_size are floats or tensors that
        broadcast per sample, e.g. (B, 1, 1, 1) (EDM-space radii differ per sample).
"""
import math

import torch


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """l2 norm over all non-batch dims, shaped (B, 1, ..., 1) so it broadcasts against x."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def l2_radius(adv_budget: float, d: int) -> float:
    """Radius of the l2 ball: eta is an RMS-per-coordinate budget (eta = 0.1 -> 5.5426 at d = 3072)."""
    # released code (docs/method.md §4.3): r = eta * sqrt(d)
    return adv_budget * math.sqrt(d)


def step_length(alpha: float, d: int, step_scale: str) -> float:
    """Length of one ascent step: `abs` is alpha itself (the authors' code), `sqrt_d` is alpha*sqrt(d) (ours).

    `sqrt_d` puts the step in the same units as the budget eta (docs/method.md §4.3).
    """
    if step_scale == "abs":
        return alpha
    if step_scale == "sqrt_d":
        return alpha * math.sqrt(d)
    raise ValueError(f"unknown step_scale {step_scale!r}; choose 'abs' or 'sqrt_d'")


def ball(norm: str, adv_budget: float, adv_step_size: float, d: int, step_scale: str = "abs"):
    """(radius, step length) of the trainers' ball: l2 radius eta*sqrt(d) and step alpha (or alpha*sqrt(d)), or
    the l-inf bound eta per coordinate and sign step alpha."""
    if norm == "l2":
        return l2_radius(adv_budget, d), step_length(adv_step_size, d, step_scale)
    if norm == "linf":
        return adv_budget, adv_step_size
    raise ValueError(f"unknown norm {norm!r}; choose 'l2' or 'linf'")


def project_l2(delta: torch.Tensor, radius) -> torch.Tensor:
    """Per-sample projection onto the l2 ball of the given radius."""
    # released code (docs/method.md §4.3): delta <- delta * min(1, r / max(||delta||, 1e-8))
    return delta * torch.clamp(radius / per_sample_norm(delta).clamp_min(1e-8), max=1.0)


def l2_step(delta: torch.Tensor, grad: torch.Tensor, step_size, radius) -> torch.Tensor:
    """One normalised-gradient ascent step, then projection onto the l2 ball (Madry et al. 2018, l2-PGD).

    A non-positive radius means "no projection", as in the released code (eta <= 0 skips it).
    """
    # released code (docs/method.md §4.3): delta <- delta + alpha * g / max(||g||, 1e-8)
    delta = delta + step_size * grad / per_sample_norm(grad).clamp_min(1e-8)
    if isinstance(radius, (int, float)) and radius <= 0:
        return delta
    return project_l2(delta, radius)


def linf_step(delta: torch.Tensor, grad: torch.Tensor, step_size, radius) -> torch.Tensor:
    """The l-infinity counterpart (ours): a sign step of step_size per coordinate, then clamp to [-radius, radius].

    Here radius is a per-coordinate bound (the same units as eta), so there is no sqrt(d). A non-positive radius
    means "no projection", as in l2_step.
    """
    # FGSM (Goodfellow et al. 2015) / PGD-linf: delta <- clip(delta + alpha * sign(g), -r, r)
    delta = delta + step_size * grad.sign()
    if isinstance(radius, (int, float)) and radius <= 0:
        return delta
    return torch.clamp(delta, -radius, radius)


STEPS = {"l2": l2_step, "linf": linf_step}


def random_perturbation(x: torch.Tensor, radius, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random direction on the l2 sphere of the given radius: r * xi / ||xi||, xi ~ N(0, I) (docs/method.md §6)."""
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return radius * xi / per_sample_norm(xi)


def pgd(loss_fn, x: torch.Tensor, radius, n_steps: int = 5, step_size=None, norm: str = "l2",
        generator: torch.Generator | None = None, random_start: bool = False) -> torch.Tensor:
    """Maximise sum_i loss_fn(x + delta)_i over the ball with n_steps ascent steps (PGD, Madry et al. 2018).

    loss_fn maps a (B, ...) input to a per-sample loss (B,). Returns delta (detached). Defaults: start at 0,
    step 2.5 r / n_steps (the usual PGD rule of thumb, which lets the iterate cross the ball; docs/method.md §6).
    random_start draws the start uniformly on the l2 sphere (or in the l-inf box).
    """
    step = STEPS[norm]
    if step_size is None:
        step_size = 2.5 * radius / n_steps
    delta = torch.zeros_like(x)
    if random_start and norm == "l2":
        delta = random_perturbation(x, radius, generator)
    elif random_start:
        delta = (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * radius
    for _ in range(n_steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            # gradient w.r.t. delta only: nothing here touches a weight's .grad
            (grad,) = torch.autograd.grad(loss_fn(x + delta).sum(), delta)
        delta = step(delta.detach(), grad, step_size, radius)
    return delta.detach()


def _demo() -> None:
    torch.manual_seed(0)
    target = torch.randn(4, 3, 8, 8)
    x = torch.zeros_like(target)

    def loss_fn(z):  # distance to a fixed point: the maximiser moves straight away from it
        return ((z - target) ** 2).flatten(1).mean(1)

    radius = l2_radius(0.1, target[0].numel())
    delta = pgd(loss_fn, x, radius, n_steps=5)
    print(f"radius {radius:.4f}; ||delta|| per sample: {per_sample_norm(delta).flatten().tolist()}")
    print(f"loss before {loss_fn(x).mean():.4f}  after PGD {loss_fn(x + delta).mean():.4f}")


if __name__ == "__main__":
    _demo()
