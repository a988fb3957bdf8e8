"""Perturbations of the noisy input x_t: the inner maximisation of adversarial training (AT), and l2-PGD for evaluation.

Paper: Wang et al. 2025, arXiv:2502.17099v1; the AT objective min_theta E max_{delta in Ball} loss(x_t + delta)
       (Sec. 3-4, Eq. (14) as the OpenReview reviews number it; see ../shared/SPEC.md §3.1, §3.3, §5).
Borrowed: normalised-gradient l2 ascent + projection = PGD (Madry et al. 2018, Eq. 2), sign step = FGSM
          (Goodfellow et al. 2015); the ball radius eta*sqrt(d) and step rule follow the authors' released code.
Uses: nothing from this repo.     Used by: dpm_at.py, cm_at.py, robustness.py.
Run: python attacks.py            (prints a tiny demo; full checks in tests/test_attacks.py)

This file knows nothing about diffusion: `free_at` and `pgd` take a loss closure loss_of_delta(delta) -> (B,) that
hides what the model is (a DDPM, an EDM denoiser, a consistency student).

Symbols: perturbation -> delta, budget eta (RMS per coordinate) -> adv_budget, l2 radius -> radius,
         step size alpha -> step_size, number of ascent steps K -> n_steps, d = elements per sample.
Shapes: delta, grad are (B, ...) with any number of non-batch dims; radius / step_size are floats or tensors that
        broadcast per sample, e.g. (B, 1, 1, 1) (EDM-space radii differ per sample).
"""
import math

import torch


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """l2 norm over all non-batch dims, shaped (B, 1, ..., 1) so it broadcasts against x."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def l2_radius(adv_budget: float, d: int) -> float:
    # SPEC §3.3 / released code: r = eta * sqrt(d), i.e. eta is an RMS-per-coordinate budget (T11: 0.1 -> 5.5426 at d=3072)
    return adv_budget * math.sqrt(d)


def step_length(alpha: float, d: int, step_scale: str) -> float:
    """Length of one ascent step. `abs`: alpha itself (the authors' code); `sqrt_d`: alpha*sqrt(d), same units as eta."""
    if step_scale == "abs":
        return alpha
    if step_scale == "sqrt_d":
        return alpha * math.sqrt(d)
    raise ValueError(f"unknown step_scale {step_scale!r}; choose 'abs' or 'sqrt_d'")


def project_l2(delta: torch.Tensor, radius) -> torch.Tensor:
    # SPEC §3.3: delta <- delta * min(1, r / max(||delta||, 1e-8))
    return delta * torch.clamp(radius / per_sample_norm(delta).clamp_min(1e-8), max=1.0)


def l2_step(delta: torch.Tensor, grad: torch.Tensor, step_size, radius) -> torch.Tensor:
    """One normalised-gradient ascent step, then projection onto the l2 ball (SPEC §3.3).

    A non-positive radius means "no projection", as in the released code (eta <= 0 skips it).
    """
    # SPEC §3.3: delta <- delta + alpha * g / max(||g||, 1e-8)
    delta = delta + step_size * grad / per_sample_norm(grad).clamp_min(1e-8)
    if isinstance(radius, (int, float)) and radius <= 0:
        return delta
    return project_l2(delta, radius)


def linf_step(delta: torch.Tensor, grad: torch.Tensor, step_size, radius) -> torch.Tensor:
    """The l-infinity counterpart: a sign step of step_size per coordinate, then clamp to [-radius, radius].

    Here radius is a per-coordinate bound (the same units as eta), so there is no sqrt(d).
    """
    # FGSM / PGD-linf: delta <- clip(delta + alpha * sign(g), -r, r)
    delta = delta + step_size * grad.sign()
    return torch.clamp(delta, -radius, radius)


STEPS = {"l2": l2_step, "linf": linf_step}


def free_at(loss_of_delta, like: torch.Tensor, opt: torch.optim.Optimizer, n_steps: int, norm: str, step_size,
            radius, after_update=None):
    """Efficient ("free") AT on one batch (SPEC §3.4 step 2; Shafahi et al. 2019 minibatch replay, delta reset to 0).

    n_steps = K passes. Each pass: one forward/backward of loss_of_delta(delta).mean(), whose single backward gives
    the weight gradient (applied by opt.step(), then after_update(), e.g. the EMA) AND the gradient w.r.t. delta
    (used for the ascent step), both at the current weights. Pass 0 sees the clean input; the last delta is used once.
    n_steps = 0 is standard training: one pass with delta = 0 and no input gradient.
    Returns (loss of pass 0, loss of the last pass, last delta), detached, without a host sync.
    """
    n_pass = max(n_steps, 1)
    delta = torch.zeros_like(like)
    for k in range(n_pass):
        ascend = k < n_pass - 1
        delta.requires_grad_(ascend)
        opt.zero_grad(set_to_none=True)
        loss = loss_of_delta(delta).mean()
        # The "free" reuse: this one backward fills p.grad for the weight update AND delta.grad for the ascent.
        loss.backward()
        if k == 0:
            clean_loss = loss.detach()
        if ascend:
            delta = STEPS[norm](delta.detach(), delta.grad, step_size, radius)
        opt.step()
        if after_update is not None:
            after_update()
    return clean_loss, loss.detach(), delta.detach()


def pgd(loss_fn, x: torch.Tensor, radius, n_steps: int = 5, step_size=None, norm: str = "l2",
        generator: torch.Generator | None = None, random_start: bool = False) -> torch.Tensor:
    """Maximise sum_i loss_fn(x + delta)_i over the ball with n_steps ascent steps (for evaluation, SPEC §5).

    loss_fn maps a (B, ...) input to a per-sample loss (B,). Returns delta (detached). Defaults: start at 0,
    step 2.5 r / n_steps (SPEC §5, the usual PGD choice that lets the iterate cross the ball).
    """
    step = STEPS[norm]
    if step_size is None:
        step_size = 2.5 * radius / n_steps
    delta = torch.zeros_like(x)
    if random_start:
        delta = random_perturbation(x, radius, generator) if norm == "l2" else \
            (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * radius
    for _ in range(n_steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(x + delta).sum(), delta)
        delta = step(delta.detach(), grad, step_size, radius)
    return delta.detach()


def random_perturbation(x: torch.Tensor, radius, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random direction on the l2 sphere of the given radius: r * xi / ||xi||, xi ~ N(0, I) (SPEC §5 baseline)."""
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return radius * xi / per_sample_norm(xi)


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
