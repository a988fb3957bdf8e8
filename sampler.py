"""Noise schedules, network parameterisations and samplers, in one place so that training and sampling agree.

Paper: Wang et al. 2025, arXiv:2502.17099v1; the few-step samplers of its evaluation (Sec. 5, Tables 1-2: IDDPM
       ancestral and DDIM at NFE 5-50). The AT losses in dpm_at.py use the schedules defined here.
Borrowed: DDPM (Ho et al. 2020) Eq. 4 (q(x_t|x_0)), Eq. 6-7 (posterior), Alg. 2 (ancestral sampling);
          IDDPM (Nichol & Dhariwal 2021) Eq. 17 (cosine schedule) and Sec. 4 (respacing);
          DDIM (Song et al. 2021) Eq. 12; EDM (Karras et al. 2022) Sec. 2 / App. C.3 (VP <-> sigma mapping).
Uses: nothing from this repo.     Used by: dpm_at.py, cm_at.py, toy_experiment.py, robustness.py.
Run: python sampler.py            (samples a tiny untrained net; full checks in tests/test_sampler.py)

One small core: every trained network is exposed as a denoiser D(x_e; sigma) -> estimate of x_0 in EDM space,
where x_e = x_t / sqrt(alpha_bar_t) = x_0 + sigma * eps and sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)
(SPEC §2.2). Each sampler is written once against D, whatever loss trained the network.

Symbols: beta_t -> beta, alpha_bar_t -> alpha_bar, respaced index set {tau_k} -> timesteps, eps -> eps,
         x_0 estimate -> x0_hat, posterior mean coefficients -> c1, c2, posterior variance beta~ -> beta_tilde.
Conventions (SPEC §0): VP indices t in {0..T-1}, index 0 least noisy; schedules in float64, cast at use.
"""
import argparse
import math
import os
import sys

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


def vp_denoiser(net, alpha_bar: torch.Tensor, return_v: bool = False):
    """Wrap an eps-prediction network net(x_t, t) trained on discrete VP steps as D(x_e; sigma) (SPEC §2.2).

    As EDM's iDDPM preconditioning (EDM App. C.3.4), sigma picks the nearest discrete step for the network's label,
    while the input/output scalings use sigma itself; on the schedule's own sigmas the two coincide exactly.
    A learned-variance network outputs 2C channels [eps, v] (IDDPM Sec. 3.1); D uses eps, and return_v=True makes
    D return (x0_hat, v) for the ancestral sampler.
    """
    log_sigma_table = vp_sigma(alpha_bar).log()  # increasing in t

    def denoise(x_e: torch.Tensor, sigma: torch.Tensor):
        table = log_sigma_table.to(x_e.device)
        # nearest step in log sigma, by binary search between the two neighbours (ties go to the lower step);
        # no data-dependent shapes, so no host sync on a GPU
        log_sigma = sigma.double().log()
        hi = torch.searchsorted(table, log_sigma).clamp(1, table.shape[0] - 1)
        lo = hi - 1
        t = torch.where(log_sigma - table[lo] <= table[hi] - log_sigma, lo, hi)  # (B,) nearest step
        s = expand(sigma, x_e)
        # SPEC §2.2: x_t = x_e / sqrt(1 + sigma^2) = sqrt(alpha_bar) x_e
        out = net(x_e / (1 + s**2).sqrt(), t.to(x_e.dtype))
        eps_hat, v = out[:, : x_e.shape[1]], out[:, x_e.shape[1]:]
        # SPEC §2.2: x0_hat = x_e - sigma * eps_hat
        x0_hat = x_e - s * eps_hat
        return (x0_hat, v) if return_v else x0_hat

    return denoise


def edm_precond(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM Table 1 (preconditioning): c_skip, c_out, c_in, c_noise for noise level sigma (any shape)."""
    # EDM Table 1: skip, output and input scalings, and the noise conditioning c_noise = ln(sigma)/4
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_denoiser(net, sigma_data: float = 0.5):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) for a network F trained with the EDM loss (EDM Eq. 7)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = (expand(c, x) for c in edm_precond(sigma.to(x.dtype), sigma_data))
        return c_skip * x + c_out * net(c_in * x, c_noise.flatten())

    return denoise


def eps_scaled(denoise, lam: float):
    """Epsilon scaling (ES, Ning et al. 2024): x0_hat from eps_hat / lam, i.e. D' = x - (x - D)/lam (SPEC §1.6)."""

    def scaled(x: torch.Tensor, sigma: torch.Tensor):
        out = denoise(x, sigma)
        x0_hat, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        # SPEC §2.2: eps_hat = (x - D)/sigma, so x - sigma * (eps_hat / lam) = x - (x - D)/lam
        x0_hat = x - (x - x0_hat) / lam
        return (x0_hat, *rest) if rest else x0_hat

    return scaled


# ----------------------------------------------------------------------------------------------------------------
# VP samplers on respaced steps (SPEC §1.4-1.5). They work in VP space x_t and call D through x_e = x_t/sqrt(ab).


def _x0_hat(denoise, x: torch.Tensor, ab: float, clip: bool):
    """Call D at the VP state x of the step with alpha_bar = ab; returns x0_hat (clipped), or (x0_hat, v)."""
    sigma = math.sqrt((1 - ab) / ab)
    out = denoise(x / math.sqrt(ab), torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float64))
    x0_hat, v = out if isinstance(out, tuple) else (out, None)
    # SPEC §1.4: clip the x_0 prediction to the data range [-1, 1] (IDDPM clip_denoised)
    x0_hat = x0_hat.clamp(-1, 1) if clip else x0_hat
    return (x0_hat, v) if isinstance(out, tuple) else x0_hat


@torch.no_grad()
def ddpm_sample(denoise, x_T: torch.Tensor, alpha_bar: torch.Tensor, timesteps: list[int],
                generator: torch.Generator | None = None, variance: str = "fixed_large", clip: bool = True):
    """Ancestral sampling (DDPM Alg. 2) on the respaced chain (SPEC §1.3-1.4). NFE = len(timesteps).

    variance: "fixed_large" = [beta~'_1, beta'_1, ..., beta'_{K-1}] (DDPM sigma^2 = beta), "fixed_small" = beta~'_k,
    "learned" = IDDPM Eq. 15 from the network's v (denoise must return (x0_hat, v): vp_denoiser(..., return_v=True)).
    """
    beta = respaced_beta(alpha_bar, timesteps)
    c1, c2, beta_tilde = posterior(beta)
    # IDDPM: log beta~ clipped, i.e. beta~'_1 in place of beta~'_0 = 0 (used by fixed_small and learned)
    log_beta_tilde = torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log() if len(timesteps) > 1 else beta.log()
    if variance == "fixed_large":
        log_var = torch.cat([beta_tilde[1:2], beta[1:]]).log() if len(timesteps) > 1 else beta.log()
    elif variance in ("fixed_small", "learned"):
        log_var = log_beta_tilde
    else:
        raise ValueError(f"unknown variance {variance!r}; choose fixed_large, fixed_small or learned")
    ab, c1, c2, log_var, log_beta = (alpha_bar[timesteps].tolist(), c1.tolist(), c2.tolist(), log_var.tolist(),
                                     beta.log().tolist())
    x = x_T
    for k in reversed(range(len(timesteps))):
        out = _x0_hat(denoise, x, ab[k], clip)
        x0_hat, v = out if isinstance(out, tuple) else (out, None)
        # DDPM Eq. 7: mean of q(x_{t-1} | x_t, x0_hat)
        x = c1[k] * x0_hat + c2[k] * x
        if k > 0:  # no noise on the last step (DDPM Alg. 2, line 4)
            if variance == "learned":
                # IDDPM Eq. 15: log Sigma = frac * log beta + (1 - frac) * log beta~, frac = (v + 1)/2
                frac = (v.to(x.dtype) + 1) / 2
                std = (0.5 * (frac * log_beta[k] + (1 - frac) * log_var[k])).exp()
            else:
                std = math.exp(0.5 * log_var[k])
            x = x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
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


# ----------------------------------------------------------------------------------------------------------------
# EDM samplers on the Karras sigma grid (SPEC §2.3-2.4)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """t_0 > ... > t_{n-1} = sigma_min, then t_n = 0 (float64, n + 1 values). EDM Eq. 5."""
    if n < 1:
        raise ValueError(f"the Karras grid needs n >= 1 points, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    # EDM Eq. 5: t_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    frac = i / max(n - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t[-1] = sigma_min if n > 1 else sigma_max  # exact endpoint (the power rounds it to 0.002000000000000003)
    return torch.cat([t, t.new_zeros(1)])


@torch.no_grad()
def edm_sample(denoise, x_T: torch.Tensor, sigmas: torch.Tensor, heun: bool = True,
               generator: torch.Generator | None = None, S_churn: float = 0.0, S_min: float = 0.0,
               S_max: float = float("inf"), S_noise: float = 1.0) -> torch.Tensor:
    """EDM Alg. 2 (Heun; Euler when heun=False) from x = x_T at sigmas[0]. NFE: Heun 2N - 1, Euler N (N = steps).

    x_T is the starting state itself (sigma_max * z); S_churn > 0 adds EDM's stochastic churn.
    """
    n = len(sigmas) - 1
    t = sigmas.tolist()
    x = x_T

    def D(x, sigma):
        return denoise(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float64))

    for i in range(n):
        # EDM Alg. 2, lines 4-6: temporarily raise the noise level to t_hat = t_i (1 + gamma)
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] * (1 + gamma)
        if gamma > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(t_hat**2 - t[i] ** 2) * S_noise * z
        # EDM Alg. 2, lines 7-8: Euler step along dx/dt = (x - D(x; t)) / t
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        # EDM Alg. 2, lines 9-11: second-order (trapezoidal) correction, except when stepping to sigma = 0
        if heun and t[i + 1] > 0:
            d_next = (x_next - D(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (d + d_next) / 2
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------------------------
# Consistency models (SPEC §4.1, §4.3; Song et al. 2023)


def cm_scalings(sigma: torch.Tensor, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """Consistency-model boundary scalings (CM App. C, Eq. 15 / SPEC §4.1): c_skip(sigma_min) = 1, c_out(sigma_min) = 0."""
    # CM App. C: c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_fn(net, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """f(x, sigma) = c_skip x + c_out F(c_in x; c_noise): c_in and c_noise as EDM (so a student can start from an EDM
    teacher's F), skip/out from cm_scalings so that f(x, sigma_min) = x exactly (SPEC §4.1)."""

    def f(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype)
        _, _, c_in, c_noise = edm_precond(sigma, sigma_data)
        c_skip, c_out = (expand(c, x) for c in cm_scalings(sigma, sigma_min, sigma_data))
        return c_skip * x + c_out * net(expand(c_in, x) * x, c_noise.flatten())

    return f


@torch.no_grad()
def consistency_sample(f, z: torch.Tensor, sigmas: torch.Tensor, indices: list[int],
                       generator: torch.Generator | None = None, sigma_min: float = 0.002) -> torch.Tensor:
    """Multistep consistency sampling (CM Alg. 1, SPEC §4.3). NFE = len(indices) - 1.

    sigmas: the N-point Karras grid t_0 = sigma_max > ... > t_{N-1} = sigma_min; indices: 0 = tau_0 < tau_1 < ... <
    tau_last = N - 1 into it. x = sigma_max z; at each tau_k (but the last): x0_hat = f(x, t_{tau_k}), then re-noise to
    the next level s' = clip(t_{tau_{k+1}}, sigma_min, sigma_max); the last level is sigma_min, so no noise is added.
    (0, N-1) is one-step generation. The output is clamped to [-1, 1].
    """
    t = sigmas.tolist()
    sigma_max = t[0]
    x = sigma_max * z
    for k in range(len(indices) - 1):
        x0_hat = f(x, torch.full((x.shape[0],), t[indices[k]], device=x.device, dtype=torch.float64))
        # SPEC §4.3: x = x0_hat + sqrt(s'^2 - sigma_min^2) z_k with s' = clip(t_{tau_{k+1}}, sigma_min, sigma_max)
        s_next = min(max(t[indices[k + 1]], sigma_min), sigma_max)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x0_hat + math.sqrt(max(s_next**2 - sigma_min**2, 0.0)) * noise
    return x.clamp(-1, 1)


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


# ----------------------------------------------------------------------------------------------------------------
# From a checkpoint to images: the command line. Only this part imports other files of the repo (unet.py to rebuild
# the network, data.py for the PNG grid), and only inside functions, so the samplers above stay a leaf.

SAMPLERS = ("ddpm", "es", "ddim", "euler", "heun", "consistency")


class SamplerError(Exception):
    """Bad input to the command line; the message is one line meant for the user."""


def load_model(path: str, device: str = "cpu", weights: str = "ema"):
    """Rebuild the network of a dpm_at.py / cm_at.py checkpoint: returns (ckpt dict, network in eval mode)."""
    import unet

    if not os.path.isfile(path):
        raise SamplerError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SamplerError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "adv-diffusion/1" or ckpt.get("kind") not in ("dpm", "cm"):
        raise SamplerError(f"{path} is not a dpm_at.py or cm_at.py checkpoint")
    net = unet.build_from_config(ckpt["net"])  # the ADM UNet, or the MLP of the 2-D toy data
    net.load_state_dict(ckpt[weights] if weights in ckpt else ckpt["model"])
    return ckpt, net.to(device).eval().requires_grad_(False)


class FastNet(torch.nn.Module):
    """The sampling fast path around a network (on by default on CUDA, see fast_sampling): channels_last input, bf16
    autocast inside the network call only, and a float32 output, so every sampler's arithmetic stays in fp32.
    Deviation [PROJECT]: the papers' samplers run the network in full precision; bf16's effect on FID has not been
    measured here, so pass --precision fp32 for numbers meant to match published ones."""

    def __init__(self, net: torch.nn.Module, bf16: bool):
        super().__init__()
        self.net, self.bf16 = net, bf16

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(x, label).float()


def fast_sampling(net: torch.nn.Module, device: str, precision: str = "fp32", compile_: bool = False):
    """CUDA: TF32, cuDNN autotuning, channels_last weights, bf16 autocast (precision "bf16"), optionally
    torch.compile (a one-time compile, then faster calls). On CPU with the defaults the network is returned unchanged."""
    on_gpu = torch.device(device).type == "cuda"
    if not on_gpu and precision == "fp32" and not compile_:
        return net
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # shapes are fixed: cuDNN times its conv algorithms once per shape
        net = net.to(memory_format=torch.channels_last)
    fast = FastNet(net, bf16=precision == "bf16")
    return torch.compile(fast) if compile_ else fast


def generate(ckpt: dict, net, name: str, steps: int, z: torch.Tensor, generator: torch.Generator, args) -> torch.Tensor:
    """Samples in [-1, 1] from initial noise z ~ N(0, I) with the named sampler; every sampler goes through D."""
    learned = ckpt["net"]["out_channels"] == 2 * ckpt["net"]["in_channels"]
    check_fits(ckpt, name, args.variance)
    if name == "consistency":
        sigmas = karras_sigmas(ckpt["num_scales"], ckpt["sigma_min"], ckpt["sigma_max"])[:-1]
        indices = [round(k * (len(sigmas) - 1) / steps) for k in range(steps + 1)]  # spread evenly, ends at N-1
        return consistency_sample(consistency_fn(net, ckpt["sigma_min"], ckpt["sigma_data"]), z, sigmas, indices,
                                  generator, ckpt["sigma_min"])
    alpha_bar = alpha_bar_from_beta(make_beta(ckpt["schedule"]))
    if ckpt["loss"] == "edm":
        denoise = edm_denoiser(net, ckpt.get("sigma_data", 0.5))
    else:
        denoise = vp_denoiser(net, alpha_bar, return_v=learned and name in ("ddpm", "es"))
    if name in ("euler", "heun"):
        sigmas = karras_sigmas(steps).to(z.device)
        return edm_sample(denoise, sigmas[0] * z, sigmas, heun=name == "heun", generator=generator,
                          S_churn=args.s_churn).clamp(-1, 1)
    if name == "ddim":
        return ddim_sample(denoise, z, alpha_bar, respace(f"ddim{steps}"), generator, eta=args.eta)
    variance = args.variance or ("learned" if learned else "fixed_large")
    if name == "es":
        denoise = eps_scaled(denoise, args.es_lambda)
    return ddpm_sample(denoise, z, alpha_bar, respace(str(steps)), generator, variance=variance)


def check_fits(ckpt: dict, name: str, variance: str | None) -> None:
    """Refuse a sampler that does not fit the checkpoint's model (SamplerError, one line)."""
    if (name == "consistency") != (ckpt["kind"] == "cm"):
        raise SamplerError(f"sampler {name!r} does not fit a {ckpt['kind']} checkpoint "
                           f"(consistency models use --sampler consistency, diffusion models any other)")
    if variance == "learned" and ckpt["net"]["out_channels"] != 2 * ckpt["net"]["in_channels"]:
        raise SamplerError("--variance learned needs a checkpoint trained with learned sigma (2C output channels)")


def nfe(name: str, steps: int) -> int:
    # EDM Sec. 3: Heun with N points costs 2N - 1 evaluations (no correction on the step to sigma = 0)
    return 2 * steps - 1 if name == "heun" else steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample a dpm_at.py / cm_at.py checkpoint to an .npz of uint8 images.")
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint written by dpm_at.py or cm_at.py")
    a("--sampler", default="heun", help=f"one of {', '.join(SAMPLERS)}; default heun")
    a("--steps", type=int, default=18, help="respaced steps (ddpm/es/ddim), Karras grid points (euler/heun: "
                                            "Heun costs 2N-1 NFE), or consistency steps; default 18")
    a("--num", type=int, default=64, help="number of images; default 64 (50000 for FID, SPEC §6)")
    a("--out", default="samples.npz", help="output .npz (key arr_0, uint8 N x H x W x 3; float32 N x d for 2-D "
                                           "points); a PNG grid (points: a scatter image) goes beside it")
    a("--batch-size", type=int, default=256, help="images per batch; default 256 (SPEC §6)")
    a("--seed", type=int, default=0, help="seed of the initial noise and of every later noise; default 0")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--weights", default="ema", choices=["ema", "model"], help="EMA (default, as evaluated in SPEC §1.7) or raw")
    a("--variance", default=None, choices=["fixed_large", "fixed_small", "learned"],
      help="ddpm/es variance; default learned for learned-sigma checkpoints, else fixed_large (SPEC §1.4)")
    a("--es-lambda", type=float, default=1.017, help="epsilon-scaling lambda (SPEC §1.6, CIFAR-10); default 1.017")
    a("--eta", type=float, default=0.0, help="DDIM eta (SPEC §1.5); default 0")
    a("--s-churn", type=float, default=0.0, help="EDM S_churn for euler/heun (SPEC §2.4); default 0")
    a("--precision", default=None, choices=["bf16", "fp32"],
      help="network arithmetic: bf16 autocast (default on CUDA; the sampler's own arithmetic stays fp32) or fp32 "
           "(default on CPU)")
    a("--compile", action="store_true", help="torch.compile the network (a one-time compile of a minute or more)")
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def main(args: argparse.Namespace) -> None:
    import numpy as np
    from tqdm import tqdm

    import data

    if args.sampler not in SAMPLERS:
        raise SamplerError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if args.steps < 1 or args.num < 1 or args.batch_size < 1:
        raise SamplerError("--steps, --num and --batch-size must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise SamplerError(f"output folder {out_dir} does not exist")
    ckpt, net = load_model(args.ckpt, args.device, args.weights)
    check_fits(ckpt, args.sampler, args.variance)
    net = fast_sampling(net, args.device, args.precision, args.compile)
    if args.compile:
        print("--compile: the first batch compiles the network (a minute or more), later batches are faster")
    vector = ckpt["net"].get("arch") == "mlp"  # 2-D points (B, d) rather than images (B, C, S, S)
    shape = (ckpt["net"]["in_channels"],) if vector else \
        (ckpt["net"]["in_channels"], ckpt["net"]["image_size"], ckpt["net"]["image_size"])
    print(f"{args.sampler}, {args.steps} steps = {nfe(args.sampler, args.steps)} NFE, {args.num} samples")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    batches = []
    for start in tqdm(range(0, args.num, args.batch_size), desc="sampling"):
        z = torch.randn((min(args.batch_size, args.num - start), *shape), generator=generator, device=args.device)
        x = generate(ckpt, net, args.sampler, args.steps, z, generator, args)
        batches.append(x.float().cpu() if vector else ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    images = torch.cat(batches)  # (N, C, H, W) uint8, or (N, d) float32 points
    tmp = args.out + ".tmp.npz"
    if vector:  # points keep their float coordinates; the picture is a scatter image of all of them
        np.savez(tmp, arr_0=images.numpy())
        os.replace(tmp, args.out)
        data.save_scatter(images, os.path.splitext(args.out)[0] + ".png")
        print(f"wrote {args.out} ({tuple(images.shape)}) and {os.path.splitext(args.out)[0]}.png")
        return
    np.savez(tmp, arr_0=images.permute(0, 2, 3, 1).numpy())  # the NHWC layout FID tools read
    os.replace(tmp, args.out)
    grid = os.path.splitext(args.out)[0] + ".png"
    data.save_image_grid(images[:64], grid)
    print(f"wrote {args.out} ({tuple(images.shape)}) and {grid}")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        _demo()
    else:
        try:
            main(parse_args())
        except SamplerError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
