"""Noise schedules, network parameterisations and samplers, in one place so that training and sampling agree.

Paper: Wang et al. 2025, arXiv:2502.17099v1; the few-step samplers of its evaluation (Sec. 5, Tables 1-2: IDDPM
       ancestral and DDIM at NFE 5-50). The AT losses in dpm_at.py use the schedules defined here.
Borrowed: DDPM (Ho et al. 2020) Eq. 4 (q(x_t|x_0)), Eq. 6-7 (posterior), Alg. 2 (ancestral sampling);
          IDDPM (Nichol & Dhariwal 2021) Eq. 17 (cosine schedule) and Sec. 4 (respacing);
          DDIM (Song et al. 2021) Eq. 12; EDM (Karras et al. 2022) Sec. 2 / App. C.3 (VP <-> sigma mapping).
Uses: nothing from this repo.     Used by: dpm_at.py, cm_at.py, eval scripts.
Run: python sampler.py            (samples a tiny untrained net; full checks in tests/test_sampler.py)

One small core: every trained network is exposed as a denoiser D(x_e; sigma) -> estimate of x_0 in EDM space,
where x_e = x_t / sqrt(alpha_bar_t) = x_0 + sigma * eps and sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)
(SPEC §2.2). Each sampler is written once against D, whatever loss trained the network.

Symbols: beta_t -> beta, alpha_bar_t -> alpha_bar, respaced index set {tau_k} -> timesteps, eps -> eps,
         x_0 estimate -> x0_hat, posterior mean coefficients -> c1, c2, posterior variance beta~ -> beta_tilde.
Conventions (SPEC §0): VP indices t in {0..T-1}, index 0 least noisy; schedules in float64, cast at use.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------------------------
# VP (DDPM) schedules, SPEC §1.1


def make_beta(schedule: str, T: int = 1000) -> torch.Tensor:
    """beta_t for t = 0..T-1 in float64 (SPEC §1.1)."""
    if schedule == "linear":
        # DDPM Sec. 4: linear from 1e-4 to 0.02, rescaled so that other T keep the same total noise (IDDPM code)
        return torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    if schedule == "cosine":
        # IDDPM Eq. 17: alpha_bar(u) = f(u)/f(0), f(u) = cos^2(((u + s)/(1 + s)) * pi/2), s = 0.008;
        # beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at 0.999 (binds only at t = T-1)
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}; choose 'linear' or 'cosine'")


def alpha_bar_from_beta(beta: torch.Tensor) -> torch.Tensor:
    # DDPM Eq. 4: alpha_bar_t = prod_{s<=t} (1 - beta_s)
    return torch.cumprod(1 - beta, dim=0)


def respace(spec: str, T: int = 1000) -> list[int]:
    """Sorted subset of {0..T-1} that a K-step sampler visits (SPEC §1.3, IDDPM Sec. 4).

    "N": N indices evenly spread from 0 to T-1 (float stride, Python round); "ddimN": {0, s, 2s, ...} with the smallest
    integer stride s giving N indices (does not include T-1, e.g. ddim10 starts at 900).
    """
    if spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"cannot make {n} DDIM steps with an integer stride from T={T}")
    n = int(spec)
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must lie in 1..{T}, got {n}")
    if n == 1:
        return [T - 1]
    stride, cur, steps = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        steps.append(round(cur))
        cur += stride
    return steps


def respaced_beta(alpha_bar: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    # SPEC §1.3: beta'_k = 1 - alpha_bar_{tau_k} / alpha_bar_{tau_{k-1}}, alpha_bar_{tau_{-1}} := 1
    ab = alpha_bar[timesteps]
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return 1 - ab / ab_prev


def posterior(beta: torch.Tensor):
    """Coefficients of q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta_tilde) for a chain with these betas.

    Works for the full chain and for a respaced one (then beta is beta'). DDPM Eq. 6-7.
    """
    alpha_bar = alpha_bar_from_beta(beta)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    # DDPM Eq. 7: posterior mean coefficients and variance
    c1 = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    c2 = (1 - alpha_bar_prev) * (1 - beta).sqrt() / (1 - alpha_bar)
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return c1, c2, beta_tilde


def expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) -> (B, 1, ..., 1) in x's dtype, so they broadcast over images or vectors."""
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    # DDPM Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps      (x0, eps: (B, ...); t: (B,) long)
    ab = expand(alpha_bar.to(x0.device)[t], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def vp_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    # SPEC §2.2 / EDM App. C.3: the EDM noise level of VP step t, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


# ----------------------------------------------------------------------------------------------------------------
# Parameterisations: network -> denoiser D(x_e; sigma)


def vp_denoiser(net, alpha_bar: torch.Tensor, channels: int | None = None):
    """Wrap an eps-prediction network net(x_t, t) trained on discrete VP steps as D(x_e; sigma) (SPEC §2.2).

    As EDM's iDDPM preconditioning (EDM App. C.3.4), sigma picks the nearest discrete step for the network's label,
    while the input/output scalings use sigma itself; on the schedule's own sigmas the two coincide exactly.
    `channels` keeps the first C output channels (the eps half of a learned-variance [eps, v] output).
    """
    log_sigma_table = vp_sigma(alpha_bar).log()

    def denoise(x_e: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        table = log_sigma_table.to(x_e.device)
        t = (table[None, :] - sigma.double().log()[:, None]).abs().argmin(dim=1)  # (B,) nearest step
        s = expand(sigma, x_e)
        # SPEC §2.2: x_t = x_e / sqrt(1 + sigma^2) = sqrt(alpha_bar) x_e
        eps_hat = net(x_e / (1 + s**2).sqrt(), t.to(x_e.dtype))
        eps_hat = eps_hat[:, : (channels or x_e.shape[1])]
        # SPEC §2.2: x0_hat = x_e - sigma * eps_hat
        return x_e - s * eps_hat

    return denoise


# ----------------------------------------------------------------------------------------------------------------
# VP samplers on respaced steps (SPEC §1.4-1.5). They work in VP space x_t and call D through x_e = x_t/sqrt(ab).


def _x0_hat(denoise, x: torch.Tensor, ab: float, clip: bool) -> torch.Tensor:
    sigma = math.sqrt((1 - ab) / ab)
    x0_hat = denoise(x / math.sqrt(ab), torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float64))
    # SPEC §1.4: clip the x_0 prediction to the data range [-1, 1] (IDDPM clip_denoised)
    return x0_hat.clamp(-1, 1) if clip else x0_hat


@torch.no_grad()
def ddpm_sample(denoise, x_T: torch.Tensor, alpha_bar: torch.Tensor, timesteps: list[int],
                generator: torch.Generator | None = None, variance: str = "fixed_large", clip: bool = True):
    """Ancestral sampling (DDPM Alg. 2) on the respaced chain (SPEC §1.3-1.4). NFE = len(timesteps).

    variance: "fixed_large" = [beta~'_1, beta'_1, ..., beta'_{K-1}] (DDPM sigma^2 = beta), "fixed_small" = beta~'_k.
    """
    ab = alpha_bar[timesteps].tolist()
    beta = respaced_beta(alpha_bar, timesteps)
    c1, c2, beta_tilde = posterior(beta)
    if variance == "fixed_large":
        var = torch.cat([beta_tilde[1:2], beta[1:]]) if len(timesteps) > 1 else beta_tilde
    elif variance == "fixed_small":
        var = beta_tilde
    else:
        raise ValueError(f"unknown variance {variance!r}; choose 'fixed_large' or 'fixed_small'")
    c1, c2, var = c1.tolist(), c2.tolist(), var.tolist()
    x = x_T
    for k in reversed(range(len(timesteps))):
        x0_hat = _x0_hat(denoise, x, ab[k], clip)
        # DDPM Eq. 7: mean of q(x_{t-1} | x_t, x0_hat)
        x = c1[k] * x0_hat + c2[k] * x
        if k > 0:  # no noise on the last step (DDPM Alg. 2, line 4)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(var[k]) * z
    return x


@torch.no_grad()
def ddim_sample(denoise, x_T: torch.Tensor, alpha_bar: torch.Tensor, timesteps: list[int],
                generator: torch.Generator | None = None, eta: float = 0.0, clip: bool = True):
    """DDIM (Song et al. 2021, Eq. 12) on the respaced chain (SPEC §1.5); eta = 0 is deterministic. NFE = len(timesteps)."""
    ab = alpha_bar[timesteps].tolist()
    x = x_T
    for k in reversed(range(len(timesteps))):
        ab_prev = ab[k - 1] if k > 0 else 1.0
        x0_hat = _x0_hat(denoise, x, ab[k], clip)
        # SPEC §1.5: re-derive eps from the (clipped) x0_hat so that the update stays on the data range
        eps = (x / math.sqrt(ab[k]) - x0_hat) / math.sqrt(1 / ab[k] - 1)
        # DDIM Eq. 16: sigma_eta = eta * sqrt((1 - ab_prev)/(1 - ab)) * sqrt(1 - ab/ab_prev)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab[k])) * math.sqrt(1 - ab[k] / ab_prev)
        # DDIM Eq. 12
        x = math.sqrt(ab_prev) * x0_hat + math.sqrt(1 - ab_prev - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def _demo() -> None:
    beta = make_beta("cosine")
    alpha_bar = alpha_bar_from_beta(beta)
    print("respace('10'):", respace("10"), " respace('ddim10'):", respace("ddim10"))

    def net(x_t, t):  # an untrained stand-in: predicts eps = 0
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, 3, 8, 8, generator=g)
    out = ddim_sample(vp_denoiser(net, alpha_bar), x_T, alpha_bar, respace("ddim10"), g)
    print("ddim10 output", tuple(out.shape), f"range [{out.min():.3f}, {out.max():.3f}]")


if __name__ == "__main__":
    _demo()
