"""Noise schedules, network parameterisations and samplers, in one place so that training and sampling agree.

Paper: Wang et al. 2025, arXiv:2502.17099v1: the samplers of its few-step sampling comparisons (IDDPM ancestral and
       DDIM at NFE 5-50; Tables 1-2 as the OpenReview reviews number them, since we could not read the paper's result
       sections themselves). The AT losses in dpm_at.py and cm_at.py use the schedules defined here.
Borrowed: DDPM (Ho et al. 2020) Eq. 4, 7, Alg. 2; IDDPM (Nichol & Dhariwal 2021) Eq. 15, 17, Sec. 4 (respacing);
          DDIM (Song et al. 2021) Eq. 12, 16; EDM (Karras et al. 2022) Eq. 5, 7, Table 1, Alg. 2, App. C.3;
          epsilon scaling (Ning et al. 2024); consistency models (Song et al. 2023) Alg. 1, App. C.
Uses: nothing from this repo (the command line imports unet.py).   Used by: dpm_at.py, cm_at.py.
Run: python sampler.py            (a stand-in network; full checks in tests/test_sampler.py)
     python sampler.py --ckpt runs/c10_at/ckpt.pt --sampler ddpm --steps 10 --seeds 0-49999 --out runs/c10_at/s10.npz
     python sampler.py --ckpt cifar10_uncond_50M_500K.pt --preset iddpm-cifar10 --sampler ddim --steps 10 --num 64

Every network becomes a denoiser D(x_e; sigma) -> x0_hat with x_e = x_t / sqrt(alpha_bar_t) = x_0 + sigma * eps,
sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) (docs/method.md §3); each sampler is written once against D and draws
all its noise from `generator` (see randn), so image i of the command line depends on seed i only.

Symbols: beta_t -> beta, alpha_bar_t -> alpha_bar, respaced indices {tau_k} -> timesteps, posterior mean
         coefficients -> c1, c2, posterior variance beta~ -> beta_tilde. VP index t in {0..T-1}, 0 least noisy
         (docs/method.md §1); schedules in float64, cast at use.
"""
import argparse
import math
import os
import pickle
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

Generators = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generators, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) of shape (B, ...); with a list of B generators, row i comes from generator i alone (EDM generate.py)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def full(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The noise level sigma for every row of x: float64 (B,) on x's device."""
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float64)


# --- VP (DDPM) schedules (docs/method.md §2) ---
def make_beta(schedule: str, T: int = 1000) -> torch.Tensor:
    """beta_t for t = 0..T-1 in float64."""
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
    """The sorted indices a K-step sampler visits (IDDPM Sec. 4). "N": N indices from 0 to T-1 at float stride, each
    rounded; "ddimN": {0, s, 2s, ...} with the smallest integer stride s giving N indices (ddim10 ends at 900)."""
    if spec.startswith("ddim"):
        n = int(spec[4:])
        strides = [s for s in range(1, T) if len(range(0, T, s)) == n]
        if not strides:
            raise ValueError(f"cannot make {n} DDIM steps with an integer stride from T={T}")
        return list(range(0, T, strides[0]))
    n = int(spec)
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must lie in 1..{T}, got {n}")
    if n == 1:  # Deviation: IDDPM's float-stride rule gives [0]; one step from pure noise must start at T - 1
        return [T - 1]
    stride, cur, steps = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        steps.append(round(cur))
        cur += stride
    return steps


def respaced_beta(alpha_bar: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    # IDDPM Sec. 4: beta'_k = 1 - alpha_bar_{tau_k} / alpha_bar_{tau_{k-1}}, alpha_bar_{tau_{-1}} := 1
    ab = alpha_bar[timesteps]
    return 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])


def posterior(beta: torch.Tensor):
    """q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta_tilde) for the chain with these betas (full or respaced)."""
    alpha_bar = alpha_bar_from_beta(beta)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    # DDPM Eq. 7: posterior mean coefficients and variance
    c1 = beta * alpha_bar_prev.sqrt() / (1 - alpha_bar)
    c2 = (1 - alpha_bar_prev) * (1 - beta).sqrt() / (1 - alpha_bar)
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return c1, c2, beta_tilde


def expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) -> (B, 1, ..., 1) in x's dtype, to broadcast over images or vectors."""
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    # DDPM Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps      (x0, eps: (B, ...); t: (B,) long)
    ab = expand(alpha_bar.to(x0.device)[t], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def vp_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    # EDM App. C.3: the EDM noise level of VP step t, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


# --- Parameterisations: network -> denoiser D(x_e; sigma) (docs/method.md §3) ---
def vp_denoiser(net, alpha_bar: torch.Tensor, return_v: bool = False):
    """D(x_e; sigma) from an eps-prediction network net(x_t, t) on VP steps (EDM App. C.3.4: the label is the step
    nearest to sigma). return_v: the network also outputs IDDPM's v (2C channels) and D returns (x0_hat, v)."""
    log_sigma_table = vp_sigma(alpha_bar).log()  # increasing in t

    def denoise(x_e: torch.Tensor, sigma: torch.Tensor):
        table = log_sigma_table.to(x_e.device)
        # nearest step in log sigma between the two searchsorted neighbours (ties go down); no host sync on a GPU
        log_sigma = sigma.double().log()
        hi = torch.searchsorted(table, log_sigma).clamp(1, table.shape[0] - 1)
        t = torch.where(log_sigma - table[hi - 1] <= table[hi] - log_sigma, hi - 1, hi)  # (B,)
        s = expand(sigma, x_e)
        # EDM App. C.3: x_t = x_e / sqrt(1 + sigma^2) = sqrt(alpha_bar) x_e, and x0_hat = x_e - sigma * eps_hat
        out = net(x_e / (1 + s**2).sqrt(), t.to(x_e.dtype))
        eps_hat, v = out[:, : x_e.shape[1]], out[:, x_e.shape[1]:]
        x0_hat = x_e - s * eps_hat
        return (x0_hat, v) if return_v else x0_hat
    return denoise


def edm_precond(sigma: torch.Tensor, sigma_data: float = 0.5):
    """c_skip, c_out, c_in, c_noise for noise level sigma (any shape)."""
    # EDM Table 1: skip, output and input scalings, and the noise conditioning c_noise = ln(sigma)/4
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_denoiser(net, sigma_data: float = 0.5):
    """D(x; sigma) for a network F trained with the EDM loss."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = (expand(c, x) for c in edm_precond(sigma.to(x.dtype), sigma_data))
        # EDM Eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
        return c_skip * x + c_out * net(c_in * x, c_noise.flatten())
    return denoise


def eps_scaled(denoise, lam: float):
    """Epsilon scaling (ES, Ning et al. 2024): D with eps_hat / lam in place of eps_hat (also for (x0_hat, v))."""

    def scaled(x: torch.Tensor, sigma: torch.Tensor):
        out = denoise(x, sigma)
        x0_hat, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        # Ning et al. 2024: eps_hat = (x - D)/sigma, so x - sigma * (eps_hat / lam) = x - (x - D)/lam
        x0_hat = x - (x - x0_hat) / lam
        return (x0_hat, *rest) if rest else x0_hat
    return scaled


# --- VP samplers on respaced steps: they work in VP space x_t and call D at x_e = x_t / sqrt(alpha_bar) ---
def _x0_hat(denoise, x: torch.Tensor, ab: float, clip_denoised: bool):
    """(x0_hat, v) at the VP state x of the step with alpha_bar = ab; v is None unless D returns it."""
    out = denoise(x / math.sqrt(ab), full(x, math.sqrt((1 - ab) / ab)))
    x0_hat, v = out if isinstance(out, tuple) else (out, None)
    # IDDPM's samplers (clip_denoised): clip the x_0 estimate to the data range [-1, 1]
    return (x0_hat.clamp(-1, 1) if clip_denoised else x0_hat), v


@torch.no_grad()
def ddpm_sample(denoise, x_T: torch.Tensor, alpha_bar: torch.Tensor, timesteps: list[int],
                generator: Generators = None, variance: str = "fixed_large",
                clip_denoised: bool = True) -> torch.Tensor:
    """Ancestral sampling (DDPM Alg. 2) on the respaced chain (IDDPM Sec. 4), NFE = len(timesteps). variance:
    "fixed_large" (beta'), "fixed_small" (beta~') or "learned" (denoise returns (x0_hat, v): IDDPM Eq. 15)."""
    if variance not in ("fixed_large", "fixed_small", "learned"):
        raise ValueError(f"unknown variance {variance!r}; choose fixed_large, fixed_small or learned")
    beta = respaced_beta(alpha_bar, timesteps)
    c1, c2, beta_tilde = posterior(beta)
    # IDDPM: beta~'_1 in place of beta~'_0 = 0 (log clipped), also as fixed_large's first variance; one step: beta
    first = beta_tilde[1:2] if len(timesteps) > 1 else beta
    log_var = torch.cat([first, (beta if variance == "fixed_large" else beta_tilde)[1:]]).log().tolist()
    ab, c1, c2, log_beta = alpha_bar[timesteps].tolist(), c1.tolist(), c2.tolist(), beta.log().tolist()
    x = x_T
    for k in reversed(range(len(timesteps))):
        x0_hat, v = _x0_hat(denoise, x, ab[k], clip_denoised)
        # DDPM Eq. 7: mean of q(x_{t-1} | x_t, x0_hat)
        x = c1[k] * x0_hat + c2[k] * x
        if k > 0:  # no noise on the last step (DDPM Alg. 2, line 4)
            if variance == "learned":
                # IDDPM Eq. 15: log Sigma = frac * log beta + (1 - frac) * log beta~, frac = (v + 1)/2
                frac = (v.to(x.dtype) + 1) / 2
                std = (0.5 * (frac * log_beta[k] + (1 - frac) * log_var[k])).exp()
            else:
                std = math.exp(0.5 * log_var[k])
            x = x + std * randn(x.shape, generator, x.device, x.dtype)
    return x


@torch.no_grad()
def ddim_sample(denoise, x_T: torch.Tensor, alpha_bar: torch.Tensor, timesteps: list[int],
                generator: Generators = None, eta: float = 0.0, clip_denoised: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) on the respaced chain; eta = 0 is deterministic. NFE = len(timesteps)."""
    ab = alpha_bar[timesteps].tolist()
    x = x_T
    for k in reversed(range(len(timesteps))):
        ab_prev = ab[k - 1] if k > 0 else 1.0
        x0_hat, _ = _x0_hat(denoise, x, ab[k], clip_denoised)
        # as IDDPM's DDIM sampler: re-derive eps from the (clipped) x0_hat so that the update stays on the data range
        eps = (x / math.sqrt(ab[k]) - x0_hat) / math.sqrt(1 / ab[k] - 1)
        # DDIM Eq. 16: sigma_eta = eta * sqrt((1 - ab_prev)/(1 - ab)) * sqrt(1 - ab/ab_prev)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab[k])) * math.sqrt(1 - ab[k] / ab_prev)
        # DDIM Eq. 12
        x = math.sqrt(ab_prev) * x0_hat + math.sqrt(1 - ab_prev - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x


# --- EDM samplers on the Karras sigma grid (docs/method.md §3) ---
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """t_0 = sigma_max > ... > t_{n-1} = sigma_min, then t_n = 0 (float64, n + 1 values)."""
    if n < 1:
        raise ValueError(f"the Karras grid needs n >= 1 points, got {n}")
    frac = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    # EDM Eq. 5: t_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t[-1] = sigma_min if n > 1 else sigma_max  # exact endpoint (the power rounds it to 0.002000000000000003)
    return torch.cat([t, t.new_zeros(1)])


@torch.no_grad()
def edm_sample(denoise, x_T: torch.Tensor, sigmas: torch.Tensor, heun: bool = True, generator: Generators = None,
               S_churn: float = 0.0) -> torch.Tensor:
    """EDM Alg. 2 (Heun; Euler if heun=False) from x_T = sigma_max z at sigmas[0]; NFE 2N - 1 (Heun) or N.
    S_churn > 0 adds EDM's stochastic churn at every level (S_min = 0, S_max = inf, S_noise = 1)."""
    # Deviation: x stays in x_T's dtype (float32 here); EDM's generate.py runs this loop in float64
    n, t, x = len(sigmas) - 1, sigmas.tolist(), x_T
    for i in range(n):
        # EDM Alg. 2, lines 4-6: temporarily raise the noise level to t_hat = t_i (1 + gamma)
        gamma = min(S_churn / n, math.sqrt(2) - 1)
        t_hat = t[i] * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t[i] ** 2) * randn(x.shape, generator, x.device, x.dtype)
        # EDM Alg. 2, lines 7-8: Euler step along dx/dt = (x - D(x; t)) / t
        d = (x - denoise(x, full(x, t_hat))) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        # EDM Alg. 2, lines 9-11: second-order (trapezoidal) correction, except when stepping to sigma = 0
        if heun and t[i + 1] > 0:
            d_next = (x_next - denoise(x_next, full(x, t[i + 1]))) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (d + d_next) / 2
        x = x_next
    return x


# --- Consistency models (Song et al. 2023; docs/method.md §5) ---
def cm_scalings(sigma: torch.Tensor, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """Consistency-model boundary scalings: c_skip(sigma_min) = 1, c_out(sigma_min) = 0."""
    # CM App. C: c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_fn(net, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """f(x, sigma) = c_skip x + c_out F(c_in x; c_noise): c_in, c_noise as EDM (a student can start from an EDM
    teacher's F), c_skip, c_out from cm_scalings, so that f(x, sigma_min) = x exactly."""

    def f(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype)
        _, _, c_in, c_noise = edm_precond(sigma, sigma_data)
        c_skip, c_out = (expand(c, x) for c in cm_scalings(sigma, sigma_min, sigma_data))
        return c_skip * x + c_out * net(expand(c_in, x) * x, c_noise.flatten())
    return f


@torch.no_grad()
def consistency_sample(f, z: torch.Tensor, sigmas: torch.Tensor, indices: list[int], generator: Generators = None,
                       sigma_min: float = 0.002, clip_denoised: bool = True) -> torch.Tensor:
    """Multistep consistency sampling (CM Alg. 1) on the Karras grid sigmas (t_0 = sigma_max ... t_{N-1} = sigma_min)
    at grid indices 0 = tau_0 < ... < tau_last = N - 1; NFE = len(indices) - 1. Output clamped to [-1, 1]."""
    t = sigmas.tolist()
    x = t[0] * z
    for k in range(len(indices) - 1):
        x0_hat = f(x, full(x, t[indices[k]]))
        if clip_denoised:  # before re-noising, as the CM authors' released sampler does by default
            x0_hat = x0_hat.clamp(-1, 1)
        # CM Alg. 1, lines 3-4: x = x0_hat + sqrt(s'^2 - sigma_min^2) z, s' = clip(t_{tau_{k+1}}, sigma_min, sigma_max)
        s_next = min(max(t[indices[k + 1]], sigma_min), t[0])
        x = x0_hat + math.sqrt(max(s_next**2 - sigma_min**2, 0.0)) * randn(x.shape, generator, x.device, x.dtype)
    return x.clamp(-1, 1)


def _demo() -> None:
    alpha_bar = alpha_bar_from_beta(make_beta("cosine"))
    print("respace('10'):", respace("10"), " respace('ddim10'):", respace("ddim10"))
    denoise = vp_denoiser(lambda x_t, t: 0.5 * x_t, alpha_bar)  # an untrained stand-in: predicts eps = x_t / 2

    def sample(seeds):  # one generator per image: its initial noise and every later noise
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return ddpm_sample(denoise, randn((len(seeds), 3, 8, 8), gens), alpha_bar, respace("10"), gens)

    out = sample(range(4))
    print("ddpm-10 on seeds 0-3:", tuple(out.shape), f"range [{out.min():.3f}, {out.max():.3f}];",
          "seed 2 alone gives the same image:", torch.equal(out[2:3], sample([2])))


# --- From a checkpoint to images: the command line. Only the checkpoint readers import another file (unet.py) ---
SAMPLERS = ("ddpm", "es", "ddim", "euler", "heun", "consistency")
# The diffusion each published layout was trained with, for a raw state dict given with --preset: (T, schedule,
# rescale_timesteps). improved-diffusion's README gives T = 4000 and the cosine schedule for both IDDPM files, and
# leaves rescale_timesteps at its default, True (script_util.py), so their networks saw t * 1000 / T. ADM on CIFAR-10
# (the authors' cifar_adv_train.sh; DDPM-IP's README): T = 1000, cosine; guided-diffusion's rescale_timesteps=False
# is the same map at T = 1000. "tiny-iddpm" (ours, for tests) copies the IDDPM files. Other presets: 1000, cosine.
ADM_DIFFUSION = {"cifar10": (1000, "cosine", False), "iddpm-cifar10": (4000, "cosine", True),
                 "iddpm-imagenet64": (4000, "cosine", True), "tiny-iddpm": (4000, "cosine", True)}


class SamplerError(Exception):
    """Bad input to the command line; the message is one line meant for the user."""


def parse_int_list(text: str, flag: str) -> list[int]:
    """"0-3,7" -> [0, 1, 2, 3, 7]: distinct integers in [0, 2**63) and inclusive ranges A-B (EDM generate.py)."""
    out = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdecimal() or (dash and not hi.isdecimal()):
            raise SamplerError(f"{flag} {text!r}: expected integers >= 0 or ranges A-B, as in 0-49999 or 0,5,7-9")
        if dash and not 0 <= int(hi) - int(lo) < 10**7:
            raise SamplerError(f"{flag} {text!r}: the range {part.strip()} ends below its start or spans 10^7 or more")
        out.extend(range(int(lo), int(hi if dash else lo) + 1))
    if len(set(out)) != len(out):
        raise SamplerError(f"{flag} {text!r} names a number twice")
    if max(out) >= 2**63:
        raise SamplerError(f"{flag} {text!r}: numbers must be below 2**63")
    return out


def check_fits(ckpt: dict, name: str, variance: str | None = None, ts: list[int] | None = None,
               steps: int | None = None) -> None:
    """Refuse a sampler or option that does not fit the checkpoint. Consistency grid indices ts must run from 0
    (x starts at t_0 = sigma_max) to N - 1 (the last step lands on sigma_min, so no noise is left in the output).
    steps must fit the T-step chain: at most T respaced steps (ddpm/es), an integer DDIM stride (ddim)."""
    if (name == "consistency") != (ckpt["kind"] == "cm"):
        raise SamplerError(f"sampler {name!r} does not fit a {ckpt['kind']} checkpoint "
                           f"(consistency models use --sampler consistency, diffusion models any other)")
    if variance == "learned" and ckpt["net"]["out_channels"] != 2 * ckpt["net"]["in_channels"]:
        raise SamplerError("--variance learned needs a checkpoint trained with learned sigma (2C output channels)")
    if ts is not None and name != "consistency":
        raise SamplerError("--ts gives consistency grid indices; other samplers take --steps")
    last = ckpt.get("num_scales", 0) - 1
    if ts is not None and (ts[0] != 0 or ts[-1] != last or any(a >= b for a, b in zip(ts, ts[1:]))):
        raise SamplerError(f"consistency grid indices {','.join(map(str, ts))} (--ts, or spread from --steps) "
                           f"must increase strictly from 0 to N - 1 = {last}")
    T = ckpt.get("diffusion_steps", 1000)
    if steps is not None and name in ("ddpm", "es") and steps > T:
        raise SamplerError(f"--steps {steps}: a {T}-step model respaces to at most {T} steps (IDDPM Sec. 4)")
    if steps is not None and name == "ddim" and not any(len(range(0, T, s)) == steps for s in range(1, T)):
        raise SamplerError(f"--steps {steps}: no integer stride gives {steps} DDIM steps out of T = {T} "
                           f"(IDDPM's 'ddimN' rule; at most {T})")


def _torch_load(path: str):
    """torch.load with weights_only=True (tensors and plain containers only), with one-line errors."""
    if not os.path.isfile(path):
        raise SamplerError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise SamplerError(f"{path} holds Python objects other than tensors, which we do not unpickle (they could "
                               f"run code); save a plain state dict: torch.save(model.state_dict(), PATH)") from None
        raise SamplerError(f"cannot read checkpoint {path} (truncated or damaged?): {str(e).splitlines()[0][:200]}")
    except Exception as e:  # a truncated zip, a file of another kind: RuntimeError, EOFError, ValueError, ...
        raise SamplerError(f"cannot read checkpoint {path} (truncated, or not a PyTorch file?): "
                           f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}") from None


def _from_adm(state: dict, name: str, preset: str, diffusion_steps: int | None, schedule: str | None,
              image_size: int | None = None) -> dict:
    import unet

    if preset not in unet.PRESETS or unet.PRESETS[preset].get("arch") == "mlp":
        raise SamplerError(f"--preset {preset!r}: choose the UNet layout of {name} among "
                           f"{', '.join(p for p in unet.PRESETS if unet.PRESETS[p].get('arch') != 'mlp')}")
    default_T, default_schedule, rescale = ADM_DIFFUSION.get(preset, (1000, "cosine", False))
    T, schedule = diffusion_steps or default_T, schedule or default_schedule
    if T < 1 or schedule not in ("linear", "cosine"):
        raise SamplerError(f"diffusion_steps {T} / schedule {schedule!r}: need T >= 1 and 'linear' or 'cosine'")
    in_ch, out_ch = state["input_blocks.0.0.weight"].shape[1], state["out.2.weight"].shape[0]
    if out_ch not in (in_ch, 2 * in_ch):
        raise SamplerError(f"{name} maps {in_ch} input channels to {out_ch}: neither eps ({in_ch}) nor [eps, v] "
                           f"({2 * in_ch}), so it is not a noise-prediction UNet")
    # IDDPM's rescale_timesteps: the network saw t * 1000 / T (UNet's time_scale)
    cfg = unet.preset_config(preset, out_ch == 2 * in_ch, None, in_ch, image_size, 1000 / T if rescale else 1.0)
    net = unet.build_from_config(cfg)
    try:
        unet.load_adm_state_dict(net, state)
    except ValueError as e:
        raise SamplerError(f"{name} does not fit --preset {preset}: {e}") from None
    weights = net.state_dict()
    return dict(format="adv-diffusion/1", kind="dpm", loss="ddpm", net=cfg, schedule=schedule, diffusion_steps=T,
                sigma_data=0.5, model=weights, ema=weights, step=0,
                args=dict(preset=preset, learn_sigma=out_ch == 2 * in_ch, loss="ddpm", schedule=schedule,
                          diffusion_steps=T))


def adm_checkpoint(source, preset: str, diffusion_steps: int | None = None, schedule: str | None = None,
                   image_size: int | None = None) -> dict:
    """A published improved-/guided-diffusion state dict (a path, or the dict itself) as a checkpoint dict in our
    format: kind "dpm", loss "ddpm", the preset's `net` config (learned sigma read from the file's output width,
    time_scale 1000 / T where the layout rescaled timesteps), schedule, diffusion_steps, model = ema = the mapped
    weights, step 0. T and the schedule default to ADM_DIFFUSION[preset], the image size to the preset's. Raises
    SamplerError (one line) for a missing, truncated or non-tensor file, a file of another kind, or a layout that
    does not fit the preset."""
    import unet

    name = source if isinstance(source, str) else "the state dict"
    state = _torch_load(source) if isinstance(source, str) else source
    if not unet.is_adm_state_dict(state):
        raise SamplerError(f"{name} is not an improved-/guided-diffusion state dict (a flat dict of tensors with "
                           f"{', '.join(unet.ADM_MARKERS)})")
    return _from_adm(state, name, preset, diffusion_steps, schedule, image_size)


def read_checkpoint(path: str, preset: str | None = None, diffusion_steps: int | None = None,
                    schedule: str | None = None) -> dict:
    """The checkpoint dict of a dpm_at.py / cm_at.py file, or of a raw ADM / IDDPM state dict (with preset), checked
    for the keys sampling needs; nothing is built yet."""
    import unet

    obj = _torch_load(path)
    if unet.is_adm_state_dict(obj):
        if preset is None:
            raise SamplerError(f"{path} is a raw improved-/guided-diffusion state dict: name its layout with --preset "
                               f"(cifar10, iddpm-cifar10 or iddpm-imagenet64)")
        return _from_adm(obj, path, preset, diffusion_steps, schedule)
    if not isinstance(obj, dict) or obj.get("format") != "adv-diffusion/1" or obj.get("kind") not in ("dpm", "cm"):
        raise SamplerError(f"{path} is neither a dpm_at.py / cm_at.py checkpoint nor an improved-/guided-diffusion "
                           f"state dict")
    if (preset, diffusion_steps, schedule) != (None, None, None):
        raise SamplerError(f"--preset, --diffusion-steps and --schedule describe a raw state dict; {path} records its "
                           f"own network and schedule")
    need = ("net", "model") + (("loss", "schedule") if obj["kind"] == "dpm" else ("num_scales", "sigma_min",
                                                                                  "sigma_max", "sigma_data"))
    missing = [k for k in need if k not in obj]
    if missing or not isinstance(obj["net"], dict) or not isinstance(obj["model"], dict):
        raise SamplerError(f"{path} is a damaged {obj['kind']} checkpoint: "
                           + (f"it has no {missing[0]!r}" if missing else "its net or model is not a dict"))
    T = obj.get("diffusion_steps", 1000)
    if not isinstance(T, int) or T < 1:
        raise SamplerError(f"{path} records diffusion_steps {T!r}; expected an integer >= 1")
    return obj


def build_model(ckpt: dict, device: str = "cpu", weights: str = "ema", name: str = "the checkpoint"):
    """The network of a checkpoint dict with its EMA (or raw) weights, in eval mode on device."""
    import unet

    try:
        net = unet.build_from_config(ckpt["net"])  # the ADM UNet, or the MLP of the 2-D toy data
    except (TypeError, ValueError) as e:
        raise SamplerError(f"{name} describes a network we cannot build: {str(e).splitlines()[0][:200]}") from None
    try:
        net.load_state_dict(ckpt[weights] if weights in ckpt else ckpt["model"])
    except RuntimeError as e:  # load_state_dict lists the missing / unexpected / mis-shaped keys after a header line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise SamplerError(f"the weights in {name} do not fit the network it describes (another preset's?): "
                           f"{(lines[1:] or lines)[0][:200]}") from None
    return net.to(device).eval().requires_grad_(False)


def load_model(path: str, device: str = "cpu", weights: str = "ema", preset: str | None = None,
               diffusion_steps: int | None = None, schedule: str | None = None):
    """Rebuild the network of a dpm_at.py / cm_at.py checkpoint or a raw ADM / IDDPM state dict (with preset):
    returns (ckpt dict, network in eval mode)."""
    ckpt = read_checkpoint(path, preset, diffusion_steps, schedule)
    return ckpt, build_model(ckpt, device, weights, path)


def fast_sampling(net: torch.nn.Module, device: str, precision: str = "fp32", compile_: bool = False):
    """The network as the samplers call it: on CUDA in channels_last with cuDNN autotuning; on CPU in fp32 without
    compile_, net itself. "bf16" autocasts inside the network call only (float32 output, so the samplers' arithmetic
    stays fp32); it is opt-in because the papers sample in full precision and we have not measured its effect on FID."""
    on_gpu = torch.device(device).type == "cuda"
    if not on_gpu and precision == "fp32" and not compile_:
        return net
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its conv algorithms once per shape
        net = net.to(memory_format=torch.channels_last)

    def fast(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return net(x, label).float()
    return torch.compile(fast) if compile_ else fast


def generate(ckpt: dict, net, name: str, steps: int, z: torch.Tensor, generator: Generators = None, *,
             variance: str | None = None, es_lambda: float = 1.017, eta: float = 0.0, s_churn: float = 0.0,
             ts: list[int] | None = None, clip_denoised: bool = True) -> torch.Tensor:
    """Samples in [-1, 1] from the noise z ~ N(0, I), (B, ...), with sampler `name` (one of SAMPLERS); generator gives
    every later noise (see randn). steps: respaced steps (ddpm/es/ddim), Karras grid points (euler/heun) or consistency
    steps (spread evenly over the grid unless ts gives the indices). The keywords are the command-line flags."""
    check_fits(ckpt, name, variance, ts, steps)
    learned = ckpt["net"]["out_channels"] == 2 * ckpt["net"]["in_channels"]
    if name == "consistency":
        n = ckpt["num_scales"]
        ts = ts or [round(k * (n - 1) / steps) for k in range(steps + 1)]
        check_fits(ckpt, name, ts=ts)  # the evenly spread default repeats indices when steps > N - 1
        f = consistency_fn(net, ckpt["sigma_min"], ckpt["sigma_data"])
        sigmas = karras_sigmas(n, ckpt["sigma_min"], ckpt["sigma_max"])[:-1]
        return consistency_sample(f, z, sigmas, ts, generator, ckpt["sigma_min"], clip_denoised)
    T = ckpt.get("diffusion_steps", 1000)  # absent in checkpoints written before T could differ from 1000
    alpha_bar = alpha_bar_from_beta(make_beta(ckpt["schedule"], T))
    if ckpt["loss"] == "edm":
        denoise = edm_denoiser(net, ckpt.get("sigma_data", 0.5))
    else:
        denoise = vp_denoiser(net, alpha_bar, return_v=learned and name in ("ddpm", "es"))
    if name in ("euler", "heun"):
        sigmas = karras_sigmas(steps)
        return edm_sample(denoise, sigmas[0].item() * z, sigmas, name == "heun", generator, s_churn).clamp(-1, 1)
    if name == "ddim":
        return ddim_sample(denoise, z, alpha_bar, respace(f"ddim{steps}", T), generator, eta, clip_denoised)
    if name == "es":
        denoise = eps_scaled(denoise, es_lambda)
    variance = variance or ("learned" if learned else "fixed_large")
    return ddpm_sample(denoise, z, alpha_bar, respace(str(steps), T), generator, variance, clip_denoised)


def nfe(name: str, steps: int) -> int:
    # EDM Sec. 3: Heun with N points costs 2N - 1 evaluations (no correction on the step to sigma = 0)
    return 2 * steps - 1 if name == "heun" else steps


def save_samples(x: torch.Tensor, path: str) -> str:
    """Write (N, C, H, W) uint8 images or (N, d) float points to path (.npz, key arr_0: NHWC uint8 as FID tools read
    them, or float32 points) and a PNG beside it (a grid of the first 64 images, or a density image of the points),
    each through a temporary file and a rename (see _atomic_write). Returns the PNG's path."""
    if x.dim() == 2:
        arr = x.float().numpy()
        # same as data.save_scatter: keep in sync. 256 x 256 bins over [-1, 1]^2 (y up), darker = more points
        counts, _, _ = np.histogram2d(-arr[:, 1].astype(np.float64), arr[:, 0].astype(np.float64), bins=256,
                                      range=[[-1, 1], [-1, 1]])
        level = np.clip(counts / max(np.percentile(counts[counts > 0], 99), 1) if counts.any() else counts, 0, 1)
        picture = (255 * (1 - level)).astype(np.uint8)
    else:
        arr = x.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        # same layout as data.save_image_grid: keep in sync. A near-square grid with 2 px black padding
        b, h, w, c = arr[:64].shape
        ncol, pad = math.ceil(math.sqrt(b)), 2
        picture = np.zeros((math.ceil(b / ncol) * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
        for i in range(b):
            top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
            picture[top:top + h, left:left + w] = arr[i]
        picture = picture[..., 0] if c == 1 else picture
        scale = max(1, 32 // h)  # images under 32 px (16x16 silhouettes) shown enlarged, as data.grid_scale does
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    png = os.path.splitext(path)[0] + ".png"
    _atomic_write(path, lambda f: np.savez(f, arr_0=arr))
    _atomic_write(png, lambda f: Image.fromarray(picture).save(f, format="PNG"))
    return png


def _atomic_write(path: str, write) -> None:
    """write(f) into a temp file beside path, then rename it onto path. A failed write (a full disk: OSError)
    removes the temp file and leaves any earlier file at path as it was (same as data._atomic_file: keep in sync)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise SamplerError(f"cannot write {path} ({e.strerror or e}); any earlier file at {path} is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample a dpm_at.py / cm_at.py checkpoint to an .npz of uint8 images.",
                                allow_abbrev=False)
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint written by dpm_at.py or cm_at.py, or a published improved-/guided-"
                                    "diffusion state dict (then give --preset)")
    a("--preset", default=None, help="a raw state dict's layout: cifar10 (ADM), iddpm-cifar10 or iddpm-imagenet64 "
                                     "(IDDPM), see unet.PRESETS")
    a("--diffusion-steps", type=int, default=None, help="a raw state dict's T; default from the preset (IDDPM "
                                                        "files: 4000, improved-diffusion README; ADM: 1000)")
    a("--schedule", default=None, choices=["linear", "cosine"], help="a raw state dict's beta schedule; default from "
                                                                     "the preset (cosine for all three)")
    a("--sampler", default="heun", help=f"one of {', '.join(SAMPLERS)}; default heun")
    a("--steps", type=int, default=None, help="respaced steps (ddpm/es/ddim), Karras grid points (euler/heun; Heun "
                                              "costs 2N-1 NFE) or consistency steps; default 18 (consistency: 1)")
    a("--seeds", default=None, help="one image per seed (EDM generate.py): 'A-B' (inclusive) or '0,5,7-9'; image i "
                                    "depends on seed i only, not on --batch-size; default 0-63 (FID: 0-49999)")
    a("--num", type=int, default=None, help="shorthand for --seeds 0-(num-1)")
    a("--out", default="samples.npz", help="output .npz (arr_0: uint8 N x H x W x 3, or float32 N x d for 2-D "
                                           "points), with a PNG grid (points: a density image) beside it")
    a("--batch-size", type=int, default=256, help="images per network call (does not change them); default 256")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--weights", default="ema", choices=["ema", "model"], help="EMA weights (default) or the raw model")
    a("--variance", default=None, choices=["fixed_large", "fixed_small", "learned"], help="ddpm/es variance (IDDPM "
      "Eq. 15); default learned for learned-sigma checkpoints, else fixed_large (DDPM Sec. 3.2)")
    a("--es-lambda", type=float, default=1.017, help="epsilon-scaling lambda (Ning et al. 2024); default 1.017")
    a("--eta", type=float, default=0.0, help="DDIM eta (DDIM Eq. 16); default 0")
    a("--s-churn", type=float, default=0.0, help="EDM S_churn for euler/heun (EDM Alg. 2); default 0")
    a("--ts", default=None, help="consistency grid indices from 0 to N-1, e.g. 0,22,39 (the CM paper's ImageNet-64 "
                                 "two-step setting); default --steps spread evenly over the grid")
    a("--no-clip-denoised", dest="clip_denoised", action="store_false", help="ddpm/es/ddim/consistency: reuse each "
      "x_0 estimate unclamped; by default we clamp it to [-1, 1], as IDDPM's and the CM authors' samplers do")
    a("--precision", default="fp32", choices=["fp32", "bf16"], help="network arithmetic; bf16 autocast is faster "
      "on GPUs, but its effect on FID is not measured; default fp32")
    a("--compile", action="store_true", help="torch.compile the network (a one-time compile of a minute or more)")
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, and the device present, before anything is read, built or written."""
    finite = math.isfinite
    rules = [("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
             ("--es-lambda", args.es_lambda, finite(args.es_lambda) and args.es_lambda > 0, "> 0 (1 = no scaling)"),
             ("--eta", args.eta, finite(args.eta) and 0 <= args.eta <= 1, "in [0, 1] (DDIM Eq. 16)"),
             ("--s-churn", args.s_churn, finite(args.s_churn) and args.s_churn >= 0, ">= 0 (EDM Alg. 2)"),
             ("--diffusion-steps", args.diffusion_steps, args.diffusion_steps is None or args.diffusion_steps >= 1,
              ">= 1")]
    for flag, value, ok, rule in rules:
        if not ok:
            raise SamplerError(f"{flag} {value}: must be {rule}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise SamplerError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SamplerError(f"--device {args.device}: PyTorch sees no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SamplerError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if not os.path.isdir(out_dir := os.path.dirname(os.path.abspath(args.out))):
        raise SamplerError(f"output folder {out_dir} does not exist")


def main(args: argparse.Namespace) -> None:
    if args.seeds is not None and args.num is not None:
        raise SamplerError("give --seeds or --num, not both (--num n means --seeds 0-(n-1))")
    if args.num is not None and args.num < 1:
        raise SamplerError(f"--num must be >= 1, got {args.num}")
    seed_text = "0-63" if args.seeds is None else args.seeds
    seeds = list(range(args.num)) if args.num else parse_int_list(seed_text, "--seeds")
    ts = parse_int_list(args.ts, "--ts") if args.ts is not None else None
    if ts is not None and args.steps is not None:
        raise SamplerError("give --steps or --ts, not both (--ts sets the consistency steps)")
    # default: 18 Karras points (EDM's CIFAR-10 Heun) or respaced steps; one step for a consistency model (CM Alg. 1)
    steps = len(ts) - 1 if ts is not None else args.steps if args.steps is not None else \
        1 if args.sampler == "consistency" else 18
    if args.sampler not in SAMPLERS:
        raise SamplerError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise SamplerError("--steps must be >= 1 (and --ts needs two indices at least)")
    check_flags(args)
    # the checkpoint is checked against the command before the network is built and before the progress bar
    ckpt = read_checkpoint(args.ckpt, args.preset, args.diffusion_steps, args.schedule)
    check_fits(ckpt, args.sampler, args.variance, ts, steps)
    if args.sampler == "consistency" and ts is None and steps > ckpt["num_scales"] - 1:
        raise SamplerError(f"--steps {steps}: a consistency model on an N = {ckpt['num_scales']} grid takes at most "
                           f"{ckpt['num_scales'] - 1} steps")
    net = fast_sampling(build_model(ckpt, args.device, args.weights, args.ckpt), args.device, args.precision,
                        args.compile)
    cfg = ckpt["net"]
    vector = cfg.get("arch") == "mlp"  # 2-D points (B, d) rather than images (B, C, S, S)
    shape = (cfg["in_channels"],) if vector else (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    print(f"{args.sampler}, {steps} steps = {nfe(args.sampler, steps)} NFE, {len(seeds)} samples, {args.precision}")
    batches = []
    for start in tqdm(range(0, len(seeds), args.batch_size), desc="sampling"):
        # one generator per image: its initial noise and every later noise come from its own seed
        gens = [torch.Generator(device=args.device).manual_seed(s) for s in seeds[start:start + args.batch_size]]
        z = randn((len(gens), *shape), gens, args.device)
        x = generate(ckpt, net, args.sampler, steps, z, gens, variance=args.variance, es_lambda=args.es_lambda,
                     eta=args.eta, s_churn=args.s_churn, ts=ts, clip_denoised=args.clip_denoised)
        batches.append(x.float().cpu() if vector else ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    samples = torch.cat(batches)  # (N, C, H, W) uint8, or (N, d) float32 points
    png = save_samples(samples, args.out)
    print(f"wrote {args.out} ({tuple(samples.shape)}) and {png}")


def cli(argv: list[str] | None = None) -> int:
    """The command line: 0 on success; bad input is one "error: ..." line on stderr and exit code 1."""
    try:
        if argv is None and len(sys.argv) == 1:
            _demo()
        else:
            main(parse_args(argv))
    except SamplerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
