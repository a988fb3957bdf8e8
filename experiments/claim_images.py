"""Does AT help a converged image model sample with few steps? The paper's protocol on 3x32x32 `shapes` (d = 3072).

Paper: Wang et al. 2025, arXiv:2502.17099v1; claim (1) of the abstract and Sec. 4: fine-tuning a converged ADM with
       efficient AT on x_t (K = 3, alpha = 0.1, eta = 0.1, target delta_detach: the released cifar_adv_train.sh,
       docs/method.md §4.3-4.4) improves sampling with 5-10 NFE; and AT for consistency models (Sec. 4).
Borrowed: DDPM-IP baseline (Ning et al. 2023, Alg. 1); free-AT minibatch replay (Shafahi et al. 2019, Alg. 1);
          ADM's "ddimN" spacing (IDDPM Sec. 4 / improved-diffusion respace.py); ES (Ning et al. 2024); Heun (EDM
          Alg. 2); consistency distillation (Song et al. 2023, Alg. 2); the Frechet distance of Gaussians on network
          features (Heusel et al. 2017, FID), here on a small CNN trained on the generator's labels.
Uses: data.py, unet.py, sampler.py, dpm_at.py, cm_at.py, eval_fid.py (frechet_distance), figures.py.  Used by: nothing.

    python experiments/claim_images.py --scale cpu    # 42 min on a shared 2-core CPU: experiments/results/claims/cpu.*
    python experiments/claim_images.py --scale gpu    # the `small` UNet, longer runs, on one GPU: .../claims/gpu.*
    python experiments/claim_images.py --quick --out /tmp/claims   # seconds: every code path at toy sizes (the test)

Protocol. (1) A feature network (FeatureNet) is trained once, deterministically, on the labels data.shapes_labels
gives; the metric is the Frechet distance between its penultimate features of N samples and of N fresh data images.
(2) One eps-prediction model is pretrained (DDPM L_simple, cosine schedule) until the held-out loss of its EMA
plateaus. (3) From that one checkpoint's bytes every arm is fine-tuned, per seed on one stream of data batches (and
the same t, eps per batch): "standard N" (N batches), "standard 3N" (3N batches: as many optimizer steps as AT's 3
per batch), "replay" (the AT loop with alpha = 0: 3 passes per batch, delta stays 0), "AT" (released recipe), "AT
sqrt_d" (step alpha*sqrt(d), which reaches the radius eta*sqrt(d)), "IP" (DDPM-IP, gamma = 0.1). (4) Each EMA model
samples with DDIM ("ddimN"), DDPM ancestral, ES and Heun from the same noise; a many-step DDIM reference; and the
clean eps error by t band. (5) CD and CD + AT are distilled from one fine-tuned standard teacher. (6) Per-seed paired
differences (AT minus each control) with a 95% Student-t interval.

Symbols: K -> adv_steps, alpha -> adv_step_size, eta -> adv_budget, DDPM-IP gamma -> input_perturbation, N data
         batches of fine-tuning -> n_batches, samples per distance -> n_eval.
"""
import argparse
import copy
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: the components
import cm_at  # noqa: E402
import data  # noqa: E402
import dpm_at  # noqa: E402
import eval_fid  # noqa: E402
import figures  # noqa: E402
import sampler  # noqa: E402
import unet  # noqa: E402

OUT = os.path.join("experiments", "results", "claims")  # relative to the working directory: run from the repo root
NFES = (5, 10, 20, 50)
BANDS = ((0, 100), (100, 300), (300, 600), (600, 1000))  # t bands of the clean eps error (VP index, 0 least noisy)
AT = dict(adv_steps=3, adv_step_size=0.1, adv_budget=0.1)  # the released recipe (cifar_adv_train.sh)
# name -> (train_step keywords (+ input_perturbation), data batches in units of N, optimizer steps per batch)
ARMS = {
    "standard N": (dict(adv_steps=0), 1, 1),
    "standard 3N": (dict(adv_steps=0), 3, 1),
    "replay": (dict(AT, adv_step_size=0.0), 1, 3),
    "AT": (AT, 1, 3),
    "AT sqrt_d": (dict(AT, adv_step_scale="sqrt_d"), 1, 3),
    "IP": (dict(adv_steps=0, input_perturbation=0.1), 1, 1),
}
CONTROLS = ("standard 3N", "replay")  # the pre-registered rule: AT must beat both

# Sizes per scale, and why:
# - net: cpu is smaller than unet's "tiny" preset (8 base channels, levels 32/16/8, no attention): a forward pass costs
#   ~1.5-2.5 ms per image on one core (tiny: ~15 ms), and sampling 30 models x 85 DDIM steps is most of the budget.
#   gpu is unet's "small" preset.
# - n_eval: samples (and fresh data images) per distance. 50 on cpu is what the budget allows (sampling is ~2/3 of
#   it); the features are 16-D so that their covariance is still estimated from 50 > 16 points, and every arm of a
#   seed samples from the same noise and is compared with the same data images, so that the paired differences cancel
#   most of the sampling noise. The data-vs-data row is the floor at this N.
# - pretrain: stop when the EMA's held-out loss (fixed images, t, eps) improved by < 1% over the last `window` steps
#   (checked every `every` steps, not before `window`), or at pretrain_max (reported as not plateaued). The cpu cap,
#   4000 steps (~12 min here), is what the budget allows; the cpu run hit it with the loss still falling 3% per window.
# - n_batches (N): 40 on cpu, so that 5 seeds x 14N passes fit in ~5 minutes; with EMA decay 0.99 the standard-N
#   EMA keeps 0.99^40 = 67% of the pretrained EMA, the 3N arms 0.99^120 = 30%.
# - threads: 1 on cpu: on the shared 2-core machine 2 threads ran a training step 10x slower (0.2 s vs 2.0 s).
# - the reference: DDIM with 250 steps (IDDPM Sec. 4 respacing); on cpu only for the arms of the rule and AT sqrt_d.
# - other samplers: on cpu only at NFE 10 (Heun 9); DDIM at every NFE for every arm, as the rule needs.
SCALES = {
    "cpu": dict(net=dict(model_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(),
                         num_head_channels=32, dropout=0.0, in_channels=3, out_channels=3, image_size=32),
                batch_size=16, lr=1e-3, ema_decay=0.99, pretrain_max=4000, window=500, every=250, heldout=256,
                n_batches=40, seeds=(0, 1, 2, 3, 4), n_eval=50, nfe=NFES, other_nfe=(10,), ref_steps=250,
                ref_arms=("standard 3N", "replay", "AT", "AT sqrt_d"), cd_seeds=(0, 1, 2), cd_batches=40,
                clf_steps=1000, clf_images=8000, device="cpu", threads=1),
    "gpu": dict(net=unet.preset_config("small"), batch_size=128, lr=2e-4, ema_decay=0.999, pretrain_max=30000,
                window=3000, every=500, heldout=2048, n_batches=500, seeds=(0, 1, 2, 3, 4), n_eval=2000, nfe=NFES,
                other_nfe=NFES, ref_steps=250, ref_arms=tuple(ARMS), cd_seeds=(0, 1, 2, 3, 4), cd_batches=1000,
                clf_steps=2000, clf_images=20000, device="cuda", threads=2),
    "quick": dict(net=dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                           num_head_channels=16, dropout=0.0, in_channels=3, out_channels=3, image_size=32),
                  batch_size=4, lr=1e-3, ema_decay=0.9, pretrain_max=6, window=4, every=2, heldout=16, n_batches=2,
                  seeds=(0, 1), n_eval=8, nfe=(2, 3, 4, 5), other_nfe=(2,), ref_steps=6,
                  ref_arms=("standard 3N", "replay", "AT"), cd_seeds=(0, 1), cd_batches=2, clf_steps=10,
                  clf_images=200, device="cpu", threads=1),
}


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def tensor_hash(x: torch.Tensor) -> str:
    return sha256(x.detach().cpu().contiguous().numpy().tobytes())


def as_x0(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) in [-1, 1], as data.random_batch scales."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, S, S) -> uint8 (N, S, S, 3), rounded as sampler.save_samples does."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# The metric: a small CNN trained on the generator's labels, and the Frechet distance of its penultimate features


class FeatureNet(nn.Module):
    """Four 3x3 convs (32 -> 16 -> 8 -> 4 px), a linear map of the 4x4 map to 16-D features, and heads for the labels of
    data.shapes_labels: count (3 classes), the kind of each of the 3 slots (disc, square, triangle, unused), and the
    background (plain, gradient). `features` (16-D) is the penultimate layer, the space the distance is measured in."""

    def __init__(self, width: int = 32, dim: int = 16):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, width, 3, 2, 1),
                                    nn.Conv2d(width, 2 * width, 3, 2, 1), nn.Conv2d(2 * width, 2 * width, 3, 2, 1)])
        self.fc = nn.Linear(2 * width * 16, dim)  # the whole 4x4 map: a mean pool could not tell a gradient
        self.heads = nn.Linear(dim, 3 + 3 * 4 + 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) in [-1, 1] -> (B, dim)
        for conv in self.convs:
            x = F.relu(conv(x))
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor):
        out = self.heads(self.features(x))
        return out[:, :3], out[:, 3:15].view(-1, 3, 4), out[:, 15:]  # count, kind per slot, background


def label_tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = data.shapes_labels(n, seed)
    kind = torch.from_numpy(labels["kind"]) % 4  # unused slot (-1) -> class 3
    return torch.from_numpy(labels["count"] - 1), kind, torch.from_numpy(labels["gradient"]).long()


def train_feature_net(steps: int, n_train: int = 8000, n_test: int = 1000,
                      seed: int = 50_000) -> tuple[FeatureNet, dict]:
    """Train FeatureNet on n_train fresh shapes (Adam, batch 64, random flips, which keep every label); returns the
    frozen net and its held-out accuracy per head on n_test other images."""
    torch.manual_seed(seed)
    net = FeatureNet()
    x = as_x0(data.make_shapes(n_train, seed))
    count, kind, background = label_tensors(n_train, seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, n_train, (64,), generator=generator)
        xb = torch.where(torch.rand(64, 1, 1, 1, generator=generator) < 0.5, x[i].flip(3), x[i])
        c, k, b = net(xb)
        loss = F.cross_entropy(c, count[i]) + F.cross_entropy(k.flatten(0, 1), kind[i].flatten()) + \
            F.cross_entropy(b, background[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net = net.eval().requires_grad_(False)
    x_test = as_x0(data.make_shapes(n_test, seed + 1))
    count, kind, background = label_tensors(n_test, seed + 1)
    with torch.no_grad():
        c, k, b = net(x_test)
    accuracy = dict(count=(c.argmax(1) == count).float().mean().item(),
                    kind=(k.argmax(2) == kind).float().mean().item(),
                    background=(b.argmax(1) == background).float().mean().item())
    return net, accuracy


@torch.no_grad()
def feature_stats(net: FeatureNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of the features of images x in [-1, 1], (N, 3, 32, 32)."""
    f = torch.cat([net.features(x[i:i + 500].cpu()) for i in range(0, len(x), 500)]).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def feature_distance(net: FeatureNet, x: torch.Tensor, y_stats) -> float:
    """Frechet distance between the features of x and the statistics y_stats (eval_fid.frechet_distance)."""
    return eval_fid.frechet_distance(*feature_stats(net, x), *y_stats)


def blur(x: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian blur of std pixels (a separable 1-D kernel of radius 3 std, reflect padding)."""
    r = max(1, math.ceil(3 * std))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * std**2))
    k = (k / k.sum()).float()
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def add_noise(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """x + std * N(0, I), clipped to the data range."""
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Statistics: a 95% Student-t interval for the mean of per-seed paired differences


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 1/2) of Student's t with df degrees of freedom, by bisection on its CDF; the CDF is 1/2 plus
    Simpson's rule over the density Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + x^2/df)^(-(df+1)/2)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(q: float, n: int = 4000) -> float:
        xs = np.linspace(0.0, q, n + 1)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(xs**2 / df))
        return 0.5 + q / (3 * n) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{0.975, n-1} s / sqrt(n), the 95% interval for the mean of n values."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan"), float("nan")
    half = t_quantile(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return float(a.mean()), float(a.mean() - half), float(a.mean() + half)


# ----------------------------------------------------------------------------------------------------------------
# Pretraining until the held-out loss plateaus, and fine-tuning every arm from the same bytes


def heldout_set(n: int, device: str, alpha_bar: torch.Tensor) -> dict:
    """Fixed held-out images with stratified t (t = 0..999 spread evenly over them) and fixed eps."""
    x0 = as_x0(data.make_shapes(n, seed=30_000)).to(device)
    t = torch.linspace(0, len(alpha_bar) - 1, n).round().long().to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(30_000)).to(device)
    return dict(x0=x0, t=t, eps=eps, x_t=sampler.q_sample(x0, t, eps, alpha_bar))


@torch.no_grad()
def eps_errors(net, held: dict, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-image clean loss ||eps - eps_theta(x_t, t)||^2 / d (DDPM L_simple, Ho et al. 2020 Eq. 14) on held."""
    out = []
    for i in range(0, len(held["t"]), 256):
        s = slice(i, i + 256)
        x_t = held["x_t"][s]
        out.append(dpm_at.ddpm_loss(net, held["x0"][s], x_t, held["t"][s], held["eps"][s], torch.zeros_like(x_t),
                                    alpha_bar))
    return torch.cat(out).cpu()


def plateaued(history: list[tuple[int, float]], window: int) -> bool:
    """True when the held-out loss improved by less than 1% over the last `window` steps."""
    step, loss = history[-1]
    before = [v for s, v in history if s == step - window]
    return bool(before) and (before[0] - loss) < 0.01 * before[0]


def pretrain(cfg: dict, images: torch.Tensor, held: dict, alpha_bar) -> tuple[bytes, list]:
    """Standard training (DDPM L_simple, uniform t) until plateaued(); returns the checkpoint bytes ({model, ema}
    state dicts, torch.save) and the held-out history [(step, loss)]."""
    torch.manual_seed(0)
    net = unet.build_from_config(cfg["net"]).to(cfg["device"])
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    train_net, opt = dpm_at.fast_path(net, cfg["device"], cfg["lr"])
    generator = torch.Generator(device=cfg["device"]).manual_seed(0)
    noise_fn, loss_fn = dpm_at.make_losses("ddpm", alpha_bar, generator)
    history = []
    for step in range(1, cfg["pretrain_max"] + 1):
        x0 = data.random_batch(images, cfg["batch_size"], generator)
        dpm_at.train_step(train_net.train(), ema, opt, x0, noise_fn, loss_fn, adv_steps=0, ema_decay=cfg["ema_decay"])
        if step % cfg["every"] == 0:
            history.append((step, eps_errors(ema, held, alpha_bar).mean().item()))
            print(f"pretrain step {step}: held-out EMA loss {history[-1][1]:.5f}", flush=True)
            if plateaued(history, cfg["window"]):
                break
    buffer = io.BytesIO()
    torch.save(dict(model=net.state_dict(), ema=ema.state_dict()), buffer)
    return buffer.getvalue(), history


def batch_stream(images: torch.Tensor, n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The fine-tuning seed's data batches: data.random_batch from a generator seeded with 1000 + seed."""
    generator = torch.Generator(device=images.device).manual_seed(1000 + seed)
    return [data.random_batch(images, batch_size, generator) for _ in range(n)]


def finetune(arm: str, start: bytes, batches: list[torch.Tensor], seed: int, cfg: dict, alpha_bar):
    """Fine-tune one arm from the checkpoint bytes `start` on the first (units x N) batches of the stream, with fresh
    AdamW state (as the authors' fine-tuning script); batch i draws its t and eps from a generator seeded with
    (seed, i), so every arm sees the same t and eps. Returns the EMA net and a record of the start and batch hashes."""
    flags, units, _ = ARMS[arm]
    flags = dict(flags)
    input_perturbation = flags.pop("input_perturbation", 0.0)
    state = torch.load(io.BytesIO(start), map_location=cfg["device"], weights_only=True)
    torch.manual_seed(seed)
    net = unet.build_from_config(cfg["net"]).to(cfg["device"])
    net.load_state_dict(state["model"])
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    ema.load_state_dict(state["ema"])
    train_net, opt = dpm_at.fast_path(net, cfg["device"], cfg["lr"])
    generator = torch.Generator(device=cfg["device"])
    noise_fn, loss_fn = dpm_at.make_losses("ddpm", alpha_bar, generator, input_perturbation=input_perturbation)
    seen = []
    for i in range(units * cfg["n_batches"]):
        generator.manual_seed(1_000_003 * (seed + 1) + i)
        x0 = batches[i]
        seen.append(tensor_hash(x0))
        dpm_at.train_step(train_net.train(), ema, opt, x0, noise_fn, loss_fn, ema_decay=cfg["ema_decay"], **flags)
    return ema, dict(start=sha256(start), batches=seen)


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation


def dpm_ckpt(net_config: dict) -> dict:
    """The keys of a dpm_at.py checkpoint that sampler.generate and cm_at.load_teacher read."""
    return dict(format="adv-diffusion/1", kind="dpm", loss="ddpm", net=net_config, schedule="cosine", sigma_data=0.5)


def run_sampler(ema, name: str, nfe: int, z: torch.Tensor, seed: int, cfg: dict) -> torch.Tensor:
    """Samples in [-1, 1] with sampler.generate at about nfe network calls: DDIM on the "ddimN" steps, DDPM
    ancestral and ES on N evenly spaced steps, Heun on (nfe + 1) // 2 Karras points (2N - 1 calls)."""
    generator = torch.Generator(device=z.device).manual_seed(2_000_003 * (seed + 1) + nfe)
    steps = (nfe + 1) // 2 if name == "heun" else nfe
    # Deviation from sampler.py's default fixed_large variance: at 5-10 steps it leaves visible noise in the output
    # (the toy experiment's finding); we take fixed_small (DDPM's beta~), as IDDPM's learned variance approaches.
    return sampler.generate(dpm_ckpt(cfg["net"]), ema, name, steps, z, generator, variance="fixed_small")


def evaluate_dpm(ema, arm: str, seed: int, cfg: dict, feature_net, ref_stats, held, alpha_bar) -> dict:
    """Distances per "sampler/NFE" (ddim at every NFE, the other samplers at other_nfe, "ref" = DDIM ref_steps for
    ref_arms), the clean eps error per t band, and 8 DDIM samples per NFE for the figure."""
    z = torch.randn((cfg["n_eval"], 3, 32, 32), generator=torch.Generator().manual_seed(3_000 + seed))
    z = z.to(cfg["device"])  # the same noise for every arm of this seed
    runs = [("ddim", n) for n in cfg["nfe"]] + [(s, n) for s in ("ddpm", "es", "heun") for n in cfg["other_nfe"]]
    if arm in cfg["ref_arms"]:
        runs.append(("ref", cfg["ref_steps"]))
    out = dict(fd={}, grid={})
    for name, nfe in runs:
        x = run_sampler(ema, "ddim" if name == "ref" else name, nfe, z, seed, cfg)
        out["fd"]["ref" if name == "ref" else f"{name}/{nfe}"] = feature_distance(feature_net, x, ref_stats)
        if name == "ddim":
            out["grid"][str(nfe)] = to_uint8(x[:8]).tolist()
    errors = eps_errors(ema, held, alpha_bar)
    out["eps"] = {f"{lo}-{hi}": errors[(held["t"].cpu() >= lo) & (held["t"].cpu() < hi)].mean().item()
                  for lo, hi in BANDS}
    return out


def distil(teacher_ckpt: dict, adv: bool, batches: list[torch.Tensor], seed: int, cfg: dict):
    """CD (Song et al. 2023, Alg. 2) with cm_at.train_step from the dpm teacher, plain or with the released AT recipe;
    the student starts from the teacher's EMA weights. Batch i draws its grid index and z from (seed, i)."""
    teacher = cm_at.load_teacher(teacher_ckpt, cfg["device"])
    net_config, state = cm_at.student_from_teacher(teacher_ckpt)
    torch.manual_seed(seed)
    student = unet.build_from_config(net_config).to(cfg["device"])
    student.load_state_dict(state)
    ema, target = copy.deepcopy(student).eval().requires_grad_(False), copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.RAdam(student.parameters(), lr=cfg["lr"])  # CM App. C: RAdam
    sigmas = sampler.karras_sigmas(18, cm_at.SIGMA_MIN, cm_at.SIGMA_MAX)[:-1].to(cfg["device"])  # CM: N = 18
    generator = torch.Generator(device=cfg["device"])
    flags = AT if adv else dict(adv_steps=0)
    for i in range(cfg["cd_batches"]):
        generator.manual_seed(4_000_003 * (seed + 1) + i)
        cm_at.train_step(student.train(), target.train(), ema, opt, teacher, batches[i], sigmas, generator,
                         ema_decay=cfg["ema_decay"], **flags)
    return ema, sigmas


def evaluate_cm(ema, sigmas, seed: int, cfg: dict, feature_net, ref_stats) -> dict:
    """1- and 2-step consistency samples (CM Alg. 1; grid indices spread evenly, as cm_at.save_grids)."""
    z = torch.randn((cfg["n_eval"], 3, 32, 32), generator=torch.Generator().manual_seed(3_000 + seed))
    f = sampler.consistency_fn(ema, cm_at.SIGMA_MIN, 0.5)
    out = dict(fd={}, grid={})
    for n_steps in (1, 2):
        generator = torch.Generator(device=cfg["device"]).manual_seed(5_000 + seed)
        indices = [round(k * (len(sigmas) - 1) / n_steps) for k in range(n_steps + 1)]
        x = sampler.consistency_sample(f, z.to(cfg["device"]), sigmas, indices, generator, cm_at.SIGMA_MIN)
        out["fd"][f"{n_steps}-step"] = feature_distance(feature_net, x, ref_stats)
        out["grid"][f"{n_steps}-step"] = to_uint8(x[:8]).tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tables, the pre-registered verdict, and the figure


def fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.3g}"


def mean_pm(values) -> str:
    """"mean ± half-width of the 95% t-interval" over seeds."""
    m, lo, hi = t_interval(values)
    return f"{fmt(m)} ± {fmt((hi - lo) / 2)}"


def diff_cell(a, b) -> str:
    """Paired differences a - b over seeds: "mean [low, high]" (95% t-interval)."""
    m, lo, hi = t_interval(np.asarray(a) - np.asarray(b))
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


def columns(cfg: dict) -> list[str]:
    return [f"ddim/{n}" for n in cfg["nfe"]] + ["ref"]


def series(results: dict, arm: str, sampler_name: str, col: str):
    """Per-seed values of one cell, or None where the cell was not run."""
    key = col if col == "ref" else f"{sampler_name}/{col.split('/')[1]}"
    values = [r["fd"].get(key) for r in results[arm]]
    return None if (sampler_name != "ddim" and col == "ref") or None in values else values


def verdict(results: dict, at_arm: str, nfe=NFES) -> str:
    """The pre-registered rule (README): supported iff under "ddimN" at NFE 5 or 10 the paired 95% interval of
    at_arm minus each control lies below 0 for BOTH controls, and no interval at NFE 50 or the reference lies above
    0 (AT visibly worse) for either control. nfe: the NFE list; its first two and its last play 5, 10 and 50."""
    def interval(control, key):
        a = [r["fd"].get(key) for r in results[at_arm]]
        b = [r["fd"].get(key) for r in results[control]]
        return None if None in a + b else t_interval(np.asarray(a) - np.asarray(b))

    wins = [n for n in nfe[:2] if all((iv := interval(c, f"ddim/{n}")) and iv[2] < 0 for c in CONTROLS)]
    late = (f"ddim/{nfe[-1]}", "ref")
    costs = [f"{c} at {k}" for c in CONTROLS for k in late if (iv := interval(c, k)) and iv[1] > 0]
    missing = [k for k in late if any(interval(c, k) is None for c in CONTROLS)]
    if wins and not costs and not missing:
        return f"{at_arm}: SUPPORTS the claim (beats both controls at NFE {', '.join(map(str, wins))}; no cost seen)."
    why = [f"beats both controls at NFE {', '.join(map(str, wins))}" if wins else
           f"does not beat both controls at NFE {nfe[0]} or {nfe[1]}"]
    why += [f"visibly worse than {', '.join(costs)}"] if costs else []
    why += [f"not measured: {', '.join(missing)}"] if missing else []
    return f"{at_arm}: does NOT support the claim ({'; '.join(why)})."


def markdown(results: dict, cd: dict, floor: dict, checks: dict, info: dict, cfg: dict) -> str:
    n_seeds, ref = len(cfg["seeds"]), f"ref DDIM-{cfg['ref_steps']}"
    head = "| " + " | ".join(f"NFE {n}" for n in cfg["nfe"]) + " | " + ref + " |"
    heun = ", ".join(str(2 * ((n + 1) // 2) - 1) for n in cfg["nfe"])  # sampler.nfe of (n + 1) // 2 points
    lines = [f"# Images at CIFAR's dimension ({info['scale']}): {n_seeds} fine-tuning seeds", "",
             f"Feature distance (Frechet distance of FeatureNet's 16-D penultimate features) between {cfg['n_eval']} "
             f"samples and {cfg['n_eval']} fresh data images; lower is better. Cells: mean ± half-width of the 95% "
             f"t-interval over {n_seeds} seeds. Heun's NFE are {heun}. '-': not run at this scale.", "",
             "| sampler | arm " + head, "| --- | --- |" + " --- |" * 5]
    for name in ("ddim", "ddpm", "es", "heun"):
        for arm in ARMS:
            cells = [series(results, arm, name, c) for c in columns(cfg)]
            lines.append(f"| {name} | {arm} | " + " | ".join("-" if v is None else mean_pm(v) for v in cells) + " |")
    lines.append("| - | data vs data | " + " | ".join([mean_pm(floor["data"])] * 5) + " |")
    lines += ["", f"Paired differences (AT arm minus control; negative = AT better): mean [95% t-interval], "
              f"{n_seeds} seeds.", "", "| difference | sampler " + head, "| --- | --- |" + " --- |" * 5]
    for name in ("ddim", "ddpm", "es", "heun"):
        for at_arm in ("AT", "AT sqrt_d"):
            for control in (c for c in ARMS if "AT" not in c):
                if name != "ddim" and control not in CONTROLS:
                    continue
                cells = [(series(results, at_arm, name, c), series(results, control, name, c)) for c in columns(cfg)]
                lines.append(f"| {at_arm} - {control} | {name} | " + " | ".join(
                    "-" if a is None or b is None else diff_cell(a, b) for a, b in cells) + " |")
    lines += ["", "Pre-registered reading, applied mechanically:", ""] + \
        [f"- {verdict(results, a, cfg['nfe'])}" for a in ("AT", "AT sqrt_d")]
    bands = [f"{lo}-{hi}" for lo, hi in BANDS]
    lines += ["", f"Clean eps error ||eps - eps_theta(x_t, t)||^2 / d x 1e3 on {cfg['heldout']} held-out images by t "
              "band (does AT cost accuracy at small t?); the last rows are paired differences.", "",
              "| arm | " + " | ".join(f"t {b}" for b in bands) + " |", "| --- |" + " --- |" * len(bands)]
    for arm in ARMS:
        lines.append(f"| {arm} | " + " | ".join(mean_pm([1e3 * r["eps"][b] for r in results[arm]]) for b in bands)
                     + " |")
    for at_arm in ("AT", "AT sqrt_d"):
        for control in CONTROLS:
            lines.append(f"| {at_arm} - {control} | " + " | ".join(diff_cell(
                [1e3 * r["eps"][b] for r in results[at_arm]], [1e3 * r["eps"][b] for r in results[control]])
                for b in bands) + " |")
    cd_seeds = len(cfg["cd_seeds"])
    lines += ["", f"Consistency distillation ({cfg['cd_batches']} batches of {cfg['batch_size']}, the same batches and "
              f"draws for both; teacher: the 'standard N' model of seed {cfg['seeds'][0]}): feature distance, "
              f"{cd_seeds} seeds.", "", "| model | 1-step | 2-step |", "| --- | --- | --- |"]
    for model in ("CD", "CD + AT"):
        lines.append(f"| {model} | " + " | ".join(mean_pm([r["fd"][k] for r in cd[model]])
                                                  for k in ("1-step", "2-step")) + " |")
    lines.append("| CD + AT - CD | " + " | ".join(diff_cell([r["fd"][k] for r in cd["CD + AT"]],
                                                            [r["fd"][k] for r in cd["CD"]])
                                                  for k in ("1-step", "2-step")) + " |")
    lines += ["", "The metric on degraded data images (same images, same fresh reference set as above):", "",
              "| images | feature distance |", "| --- | --- |", f"| data vs data | {mean_pm(floor['data'])} |"]
    lines += [f"| {k} | {mean_pm(v)} |" for k, v in checks.items()]
    lines += ["", "| arm | data batches | optimizer steps | seconds per seed (train + sampling) |",
              "| --- | --- | --- | --- |"]
    for arm, (_, units, k) in ARMS.items():
        lines.append(f"| {arm} | {units * cfg['n_batches']} | {units * cfg['n_batches'] * k} | "
                     f"{info['seconds'][arm] / n_seeds:.0f} |")
    pre = info["pretrain"]
    status = "plateaued" if pre["plateaued"] else "NOT plateaued: stopped at the cap"
    lines += ["", f"Pretraining: {pre['steps']} steps of batch {cfg['batch_size']} ({status}; held-out EMA loss "
              f"{pre['history'][0][1]:.4f} at step {pre['history'][0][0]} -> {pre['history'][-1][1]:.4f}). "
              "FeatureNet held-out accuracy: "
              + ", ".join(f"{k} {v:.3f}" for k, v in info["feature_net_accuracy"].items()) + ".",
              f"Network: {info['parameters'] / 1e6:.3f}M parameters, {json.dumps(cfg['net'])}.",
              f"Machine: {info['machine']}; nproc {info['nproc']}; torch {info['torch']}; {cfg['threads']} thread(s); "
              f"load average at start {info['load_start']}, at end {info['load_end']}.",
              f"Command: `{info['command']}`; {info['wall_s']:.0f} s wall time in all."]
    return "\n".join(lines) + "\n"


def draw(results: dict, cd: dict, floor: dict, cfg: dict, fresh_grid: np.ndarray) -> bytes:
    """Sample grids (seed 0: DDIM per arm and NFE, CD 1/2-step), distance vs NFE, and AT minus controls vs NFE."""
    arms = list(ARMS)
    colors = {a: figures.COLORS[i] for i, a in enumerate(arms)}
    cell_w, cell_h, left = 140, 84, 110
    rows = [("data", [("fresh", fresh_grid)])]
    nfe = list(cfg["nfe"])
    rows += [(a, [(f"DDIM {n}", np.asarray(results[a][0]["grid"][str(n)], np.uint8)) for n in nfe]) for a in arms]
    rows += [(m, [(k, np.asarray(cd[m][0]["grid"][k], np.uint8)) for k in ("1-step", "2-step")]) for m in cd]
    width = max(left + cell_w * len(nfe) + 10, 2 * 420 + 20)
    height = 60 + cell_h * len(rows) + 290
    image = figures.new_figure(width, height)
    figures.title(image, (10, 8), f"shapes 3x32x32: samples (seed {cfg['seeds'][0]}), feature distance vs NFE, and "
                                  "AT minus controls (95% t-intervals)", 14)
    for r, (name, panels) in enumerate(rows):
        y = 40 + cell_h * r
        figures.title(image, (8, y + cell_h // 2 - 4), name, 11)
        for c, (label, grid) in enumerate(panels):
            figures.image_panel(image, (left + cell_w * c, y + 14), grid, 4, label)
    y0 = 50 + cell_h * len(rows)
    lines = []
    for a in arms:
        stats = [t_interval([r["fd"][f"ddim/{n}"] for r in results[a]]) for n in nfe]
        lines.append(dict(name=a, x=nfe, y=[s[0] for s in stats], err=[(s[2] - s[1]) / 2 for s in stats],
                          color=colors[a]))
    figures.line_panel(image, (10, y0, 420, y0 + 240), lines, "DDIM (ddimN): feature distance", "NFE", "",
                       xlog=True, hline=float(np.mean(floor["data"])))
    diffs = []
    for i, control in enumerate(CONTROLS):
        stats = [t_interval(np.array([r["fd"][f"ddim/{n}"] for r in results["AT"]]) -
                            np.array([r["fd"][f"ddim/{n}"] for r in results[control]])) for n in nfe]
        diffs.append(dict(name=f"AT - {control}", x=nfe, y=[s[0] for s in stats],
                          err=[(s[2] - s[1]) / 2 for s in stats], color=figures.COLORS[6 + i]))
    figures.line_panel(image, (430, y0, 840, y0 + 240), diffs, "DDIM: AT minus control", "NFE", "", xlog=True,
                       hline=0.0)
    figures.legend(image, (10, y0 + 246), [(a, colors[a]) for a in arms] + [(d["name"], d["color"]) for d in diffs])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_atomic(path: str, blob: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="cpu", choices=["cpu", "gpu"], help="sizes (SCALES): cpu = a network smaller "
                   "than the tiny preset, ~40 min on 2 shared cores; gpu = the small preset on one GPU; default cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes, every code path in seconds (for the test)")
    p.add_argument("--out", default=OUT, help=f"output folder; default {OUT}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default the scale's (cpu: 1)")
    p.add_argument("--device", default=None, help="default the scale's (cpu: cpu, gpu: cuda)")
    return p.parse_args(argv)


def machine_info() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return dict(load=" ".join(f"{v:.2f}" for v in load), nproc=os.cpu_count(), torch=torch.__version__,
                machine=f"{platform.machine()} {platform.processor() or cpu_name()}")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        return ""


def main(args: argparse.Namespace, argv: list[str]) -> dict:
    scale = "quick" if args.quick else args.scale
    cfg = dict(SCALES[scale], **{k: v for k, v in (("threads", args.threads), ("device", args.device)) if v})
    torch.set_num_threads(cfg["threads"])
    start, info = time.time(), dict(scale=scale, command="python experiments/claim_images.py " + " ".join(argv))
    machine = machine_info()
    info.update(load_start=machine["load"], nproc=machine["nproc"], torch=machine["torch"], machine=machine["machine"])
    os.makedirs(args.out, exist_ok=True)
    # 1. The metric's network, trained once
    n_test = 200 if args.quick else 1000
    feature_net, info["feature_net_accuracy"] = train_feature_net(cfg["clf_steps"], cfg["clf_images"], n_test)
    print(f"FeatureNet held-out accuracy {info['feature_net_accuracy']} ({time.time() - start:.0f} s)", flush=True)
    # 2. Pretraining until the held-out loss plateaus
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine")).to(cfg["device"])
    images = data.load_dataset("shapes", seed=0, num_shapes=512 if args.quick else 10_000).to(cfg["device"])
    held = heldout_set(cfg["heldout"], cfg["device"], alpha_bar)
    start_bytes, history = pretrain(cfg, images, held, alpha_bar)
    info["pretrain"] = dict(steps=history[-1][0], history=history, sha256=sha256(start_bytes),
                            plateaued=plateaued(history, cfg["window"]), seconds=time.time() - start)
    info["parameters"] = unet.count_parameters(unet.build_from_config(cfg["net"]))
    # 3.-4. Every arm from the same bytes and batches, per seed; evaluation with common random numbers
    results, records, info["seconds"] = {a: [] for a in ARMS}, {a: [] for a in ARMS}, {a: 0.0 for a in ARMS}
    floor, checks, teacher_state = dict(data=[]), {}, None
    for seed in cfg["seeds"]:
        ref_stats = feature_stats(feature_net, as_x0(data.make_shapes(cfg["n_eval"], 40_000 + seed)))
        other = as_x0(data.make_shapes(cfg["n_eval"], 45_000 + seed))
        floor["data"].append(feature_distance(feature_net, other, ref_stats))
        for name, x in [(f"blur std {s} px", blur(other, s)) for s in (0.5, 1.0, 2.0)] + \
                [(f"noise std {s}", add_noise(other, s, seed)) for s in (0.05, 0.1, 0.2)]:
            checks.setdefault(name, []).append(feature_distance(feature_net, x, ref_stats))
        batches = batch_stream(images, 3 * cfg["n_batches"], cfg["batch_size"], seed)
        for arm in ARMS:
            t0 = time.time()
            ema, record = finetune(arm, start_bytes, batches, seed, cfg, alpha_bar)
            results[arm].append(evaluate_dpm(ema, arm, seed, cfg, feature_net, ref_stats, held, alpha_bar))
            records[arm].append(dict(start=record["start"], batches=len(record["batches"]),
                                     batches_sha256=sha256("".join(record["batches"]).encode())))
            info["seconds"][arm] += time.time() - t0
            if arm == "standard N" and seed == cfg["seeds"][0]:
                teacher_state = copy.deepcopy(ema.state_dict())
            fd = " ".join(f"{k} {v:.3g}" for k, v in results[arm][-1]["fd"].items())
            print(f"seed {seed} {arm}: {time.time() - t0:.0f} s | {fd} | total {time.time() - start:.0f} s", flush=True)
    # 5. CD and CD + AT from one fine-tuned standard teacher
    teacher_ckpt = dict(dpm_ckpt(cfg["net"]), ema=teacher_state)
    cd = {"CD": [], "CD + AT": []}
    for seed in cfg["cd_seeds"]:
        ref_stats = feature_stats(feature_net, as_x0(data.make_shapes(cfg["n_eval"], 40_000 + seed)))
        batches = batch_stream(images, cfg["cd_batches"], cfg["batch_size"], 500 + seed)
        for model in cd:
            ema, sigmas = distil(teacher_ckpt, model == "CD + AT", batches, seed, cfg)
            cd[model].append(evaluate_cm(ema, sigmas, seed, cfg, feature_net, ref_stats))
            print(f"seed {seed} {model}: {cd[model][-1]['fd']} | total {time.time() - start:.0f} s", flush=True)
    # 6. Files
    info.update(wall_s=time.time() - start, load_end=machine_info()["load"])
    stem = os.path.join(args.out, scale)
    report = markdown(results, cd, floor, checks, info, cfg)
    fresh_grid = data.make_shapes(8, 40_000 + cfg["seeds"][0])
    write_atomic(stem + ".png", draw(results, cd, floor, cfg, fresh_grid))
    strip = {a: [{k: v for k, v in r.items() if k != "grid"} for r in rs] for a, rs in results.items()}
    record = dict(config=cfg, info=info, floor=floor, checks=checks, results=strip, records=records,
                  cd={m: [{k: v for k, v in r.items() if k != "grid"} for r in rs] for m, rs in cd.items()})
    write_atomic(stem + ".json", json.dumps(record, indent=1).encode())
    write_atomic(stem + ".md", report.encode())
    print(report)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png in {time.time() - start:.0f} s")
    return record


if __name__ == "__main__":
    main(parse_args(), sys.argv[1:])
