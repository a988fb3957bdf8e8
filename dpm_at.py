"""Train a diffusion model (DPM) with efficient ("free") adversarial training on the noisy input x_t.

Paper: Wang et al. 2025, arXiv:2502.17099v1; DRO over a ball around q(x_t) <=> AT on x_t (Sec. 3-4, the AT objective
       Eq. (14)); efficient AT (Sec. 4): K ascent steps on delta, each reusing the backward pass of a weight update.
Borrowed: DDPM (Ho et al. 2020) Alg. 1 and L_simple (Eq. 14 of DDPM); ADM / IDDPM CIFAR-10 recipe (Nichol & Dhariwal
          2021); "free" AT minibatch replay (Shafahi et al. 2019, Alg. 1). Loop semantics follow the authors' released
          code, see ../shared/SPEC.md §3.4. The input-perturbation baseline is DDPM-IP (Ning et al. 2023, Alg. 1).
Uses: unet.py, data.py, sampler.py, attacks.py.     Used by: nothing (writes checkpoints that cm_at.py and
      sampler.py read: the checkpoint dict, not this code, is the contract).

    python dpm_at.py --dataset shapes                      # offline demo on a CPU: a grid every 200 steps
    python dpm_at.py --dataset shapes --tiny --steps 20    # seconds: watch the loop run
    python dpm_at.py --dataset ring --steps 3000           # 2-D toy (MLP), a scatter of samples every 1000 steps
    python dpm_at.py --dataset cifar10 --adv-steps 0 --steps 250000 --out runs/c10_clean   # clean pre-training
    python dpm_at.py --dataset cifar10 --init-from runs/c10_clean/ckpt.pt --out runs/c10_at # AT fine-tuning (paper)
    torchrun --nproc_per_node=4 dpm_at.py --dataset cifar10 --init-from runs/c10_clean/ckpt.pt --out runs/c10_at
                                                           # the same on 4 GPUs, 32 images each (the paper's run)

Symbols: x_0 -> x0, eps -> eps, alpha_bar_t -> alpha_bar, perturbation delta -> delta, K -> adv_steps,
         ascent step alpha -> adv_step_size, budget eta (RMS per coordinate, radius eta*sqrt(d)) -> adv_budget.
"""
import argparse
import copy
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import attacks
import data
import sampler
import unet

# Per-dataset defaults; explicit flags win. cifar10 = the authors' cifar_adv_train.sh (SPEC §1.7, §3.4): batch 128,
# AdamW lr 1e-4, EMA 0.9999, 200K AT steps after 250K clean ones. shapes / tiny are ours [PROJECT]: small enough for
# a 2-core CPU (~1.3 s per AT batch), with a larger lr and a short EMA so that grids show progress within minutes.
DATASET_DEFAULTS = {
    "cifar10": dict(preset="cifar10", steps=200_000, batch_size=128, lr=1e-4, ema_decay=0.9999, learn_sigma=True,
                    t_sampler="loss-second-moment", log_every=100, grid_every=5000, save_every=5000, num_grid=64),
    "shapes": dict(preset="tiny", steps=2000, batch_size=16, lr=1e-3, ema_decay=0.99, learn_sigma=False,
                   t_sampler="uniform", log_every=20, grid_every=200, save_every=200, num_grid=64),
    # [PROJECT] the 2-D point sets (data.POINT_SETS) train the MLP; "grids" are scatter images of num_grid samples
    "points": dict(preset="mlp2d", steps=3000, batch_size=512, lr=1e-3, ema_decay=0.995, learn_sigma=False,
                   t_sampler="uniform", log_every=100, grid_every=1000, save_every=1000, num_grid=5000),
}
# torch.compile's modes, for --compile-mode; the max-autotune ones also time candidate kernels (a longer compile)
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
TINY = dict(preset="tiny", steps=20, batch_size=8, ema_decay=0.9, log_every=5, grid_every=10, save_every=10,
            num_grid=16, num_shapes=512)


class UserError(Exception):
    """Bad input; main prints the one-line message and exits 1."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dataset", default="shapes", help="cifar10 | shapes (offline, generated) | folder:PATH; default shapes")
    a("--data-dir", default="./data", help="where cifar-10-python.tar.gz lives or is downloaded; default ./data")
    a("--out", default=None, help="run directory; default runs/<dataset>_<at|std>")
    a("--steps", type=int, default=None, help="data batches to train on (the step counter); cifar10: 200000")
    a("--batch-size", type=int, default=None, help="images per batch, over all torchrun processes; cifar10: 128 "
                                                   "(SPEC §1.7: 4 GPUs x 32)")
    a("--lr", type=float, default=None, help="AdamW learning rate, constant; cifar10: 1e-4 (SPEC §1.7)")
    a("--ema-decay", type=float, default=None, help="EMA decay per optimizer step; cifar10: 0.9999 (SPEC §1.7)")
    a("--preset", default=None, choices=list(unet.PRESETS), help="network size (unet.PRESETS); cifar10: cifar10")
    a("--dropout", type=float, default=None, help="dropout; default the preset's (cifar10: 0.3, SPEC §1.7)")
    a("--loss", default="ddpm", choices=list(BATCHES), help="ddpm: eps-prediction on VP x_t (SPEC §1.2, the paper's "
      "CIFAR-10 run); edm: EDM's preconditioned denoiser (SPEC §2.1); default ddpm")
    a("--schedule", default="cosine", choices=["cosine", "linear"], help="VP beta schedule: cosine | linear (SPEC §1.1); default cosine")
    a("--learn-sigma", default=None, action=argparse.BooleanOptionalAction,
      help="ddpm: learned variance + hybrid loss (SPEC §1.2); default on for cifar10 (SPEC §1.7), else off")
    a("--t-sampler", default=None, choices=["uniform", "loss-second-moment"],
      help="ddpm timestep sampling (SPEC §1.2); cifar10: loss-second-moment (SPEC §1.7), else uniform")
    a("--adv-steps", type=int, default=3, help="K inner passes per batch, each an optimizer step (SPEC §3.4); "
                                                "0 = standard training; default 3")
    a("--adv-step-size", type=float, default=0.1, help="ascent step alpha (SPEC §3.3 adv_lr); default 0.1")
    a("--adv-budget", type=float, default=0.1, help="eta: l2 radius eta*sqrt(d), or the l-inf bound (SPEC §3.3 "
                                                    "adv_max_norm); default 0.1")
    a("--adv-norm", default="l2", choices=["l2", "linf"], help="perturbation ball; default l2 (the released code)")
    a("--adv-step-scale", default="abs", choices=["abs", "sqrt_d"],
      help="l2 step length alpha (abs, released code) or alpha*sqrt(d); default abs")
    a("--adv-space", default="vp", choices=["vp", "raw"], help="edm: budget mapped from VP space, "
      "r = eta sqrt(d) sqrt(1 + sigma^2) (vp), or taken as is in EDM space (raw) (SPEC §3.6); default vp")
    a("--adv-target", default="delta_detach", choices=list(TARGETS),
      help="regression target under perturbation (SPEC §3.2); default delta_detach (authors' CIFAR-10 script)")
    a("--input-perturbation", type=float, default=0.0, help="gamma of the DDPM-IP baseline (Ning et al. 2023, "
      "Alg. 1): x_t built from eps + gamma*xi, target eps; ddpm loss only; 0 = off (default), the paper uses 0.1")
    a("--init-from", default=None, help="start from this checkpoint's weights (+EMA), fresh optimizer, step 0")
    a("--resume", default=None, help="continue a run from its checkpoint (weights, EMA, optimizer, step, RNG)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default cuda if available")
    a("--precision", default=None, choices=["bf16", "fp32"],
      help="bf16 autocast (default on CUDA; weights, optimizer, EMA and delta stay fp32) or fp32 (default on CPU)")
    a("--compile", action="store_true", help="torch.compile the network for training (all K inner passes run "
                                             "through it); costs a one-time compile of a minute or more")
    a("--compile-mode", default=None, choices=COMPILE_MODES,
      help="torch.compile mode with --compile; default reduce-overhead (CUDA graphs) on one GPU, default otherwise "
           "(on an H200 reduce-overhead halved the compiled cifar10 step: README, Speed)")
    a("--seed", type=int, default=0, help="seeds init, data, t, eps, dropout and the grids; default 0")
    a("--num-shapes", type=int, default=None, help="size of the generated shapes set; default 10000 (--tiny: 512)")
    a("--log-every", type=int, default=None, help="steps between log lines / metrics.jsonl records")
    a("--grid-every", type=int, default=None, help="steps between PNG sample grids (EMA model, fixed seed)")
    a("--save-every", type=int, default=None, help="steps between checkpoints (ckpt.pt, written atomically)")
    a("--num-grid", type=int, default=None, help="images per grid")
    a("--grid-steps", type=int, default=25, help="DDIM steps for the grids (respacing 'N', SPEC §1.3); default 25")
    a("--tiny", action="store_true", help="tiny UNet, tiny data, few steps: see the loop run on a laptop CPU")
    a("--dry-run", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the dataset's defaults (then --tiny's); explicit flags always win."""
    # folder:PATH trains with the cifar10 recipe
    family = "points" if args.dataset in data.POINT_SETS else "shapes" if args.dataset == "shapes" else "cifar10"
    tiny = dict(TINY, preset="mlp2d") if family == "points" else TINY  # points keep their MLP under --tiny
    defaults = dict(DATASET_DEFAULTS[family], **(tiny if args.tiny else {}))
    defaults.setdefault("num_shapes", 10000)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.dirname(args.resume) if args.resume else \
            os.path.join("runs", f"{args.dataset.split(':')[0]}_{'at' if args.adv_steps > 0 else 'std'}")
    for key in ("steps", "batch_size", "log_every", "grid_every", "save_every", "num_grid", "grid_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.adv_steps < 0:
        raise UserError(f"--adv-steps must be >= 0, got {args.adv_steps}")
    if args.input_perturbation < 0 or (args.input_perturbation > 0 and args.loss != "ddpm"):
        raise UserError("--input-perturbation must be >= 0 and belongs to --loss ddpm (DDPM-IP is an eps-loss recipe)")
    if (family == "points") != (unet.PRESETS[args.preset].get("arch") == "mlp"):
        raise UserError(f"--preset {args.preset} does not fit --dataset {args.dataset} (2-D points need mlp2d)")
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.compile_mode is None:  # CUDA graphs replay the network's forward and backward; untested under torchrun
        one_gpu = args.device.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) == 1
        args.compile_mode = "reduce-overhead" if one_gpu else "default"
    if args.loss == "edm" and (args.learn_sigma or args.t_sampler != "uniform"):
        args.learn_sigma, args.t_sampler = False, "uniform"  # both belong to the VP/DDPM loss only
    return args


# ----------------------------------------------------------------------------------------------------------------
# The loss and its adversarial form


# SPEC §3.2: the noise consistent with (x_0, x_t + delta) is eps + delta/sqrt(1 - alpha_bar_t). The three targets
# have the same value; they differ only in the gradient w.r.t. delta (parameter gradients are identical).
TARGETS = {
    "delta": lambda eps, delta, s: eps + delta / s,
    "delta_detach": lambda eps, delta, s: eps + delta.detach() / s,
    "original": lambda eps, delta, s: eps,
}


def ddpm_loss(net, x_t, t, eps, delta, alpha_bar, target: str = "delta_detach", x0=None) -> torch.Tensor:
    """Per-sample AT loss (B,) at x_t + delta. SPEC §3.1 (the paper's Eq. (14) as we read it):

        l = mean || eps + delta / sqrt(1 - alpha_bar_t) - eps_theta(x_t + delta, t) ||^2
    With delta = 0 this is DDPM's L_simple (Ho et al. 2020, Eq. 14). A learned-variance network ([eps, v] output)
    adds IDDPM's L_vb (the "hybrid" loss, SPEC §1.2), which needs x0.
    """
    s = sampler.expand((1 - alpha_bar.to(x_t.device)[t]).sqrt(), x_t)  # (B, 1, 1, 1)
    out = net(x_t + delta, t.to(x_t.dtype))
    eps_hat, v = out[:, : x_t.shape[1]], out[:, x_t.shape[1]:]
    loss = (TARGETS[target](eps, delta, s) - eps_hat).pow(2).flatten(1).mean(1)
    if v.shape[1] == 0:
        return loss
    # SPEC §3.2: the posterior is conditioned on x_t + delta (delta), sg(x_t + delta) (delta_detach) or x_t (original)
    x_cond = {"delta": x_t + delta, "delta_detach": (x_t + delta).detach(), "original": x_t}[target]
    # IDDPM Sec. 3.1: L_vb sees the mean through a frozen eps (it trains only the variance); weight T/1000 = 1
    return loss + vb_term(x0, x_cond, t, eps_hat.detach(), v, alpha_bar)


def vb_term(x0, x_t, t, eps_hat, v, alpha_bar) -> torch.Tensor:
    """IDDPM L_vb per sample in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0."""
    alpha_bar = alpha_bar.to(x_t.device)
    beta = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])  # DDPM: alpha_bar_t = prod (1 - beta)
    c1, c2, beta_tilde = sampler.posterior(beta)
    log_beta_tilde = torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log()  # IDDPM: clipped at t = 0
    c1, c2, lbt, lb, ab = (sampler.expand(a[t], x_t) for a in (c1, c2, log_beta_tilde, beta.log(), alpha_bar))
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()  # DDPM Eq. 15 inverted (no clipping in training)
    # IDDPM Eq. 15: log Sigma_theta = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1)/2
    frac = (v + 1) / 2
    model_log_var = frac * lb + (1 - frac) * lbt
    true_mean, model_mean = c1 * x0 + c2 * x_t, c1 * x0_hat + c2 * x_t  # DDPM Eq. 7
    # KL of two Gaussians, per coordinate
    kl = 0.5 * (-1 + model_log_var - lbt + (lbt - model_log_var).exp()
                + (true_mean - model_mean) ** 2 * (-model_log_var).exp())
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)  # DDPM Sec. 3.3 decoder
    per_dim = torch.where((t == 0).view(-1, *([1] * (x_t.dim() - 1))), nll, kl) / math.log(2.0)
    return per_dim.flatten(1).mean(1)


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log P(x) of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2) integrated over its bin (DDPM Sec. 3.3)."""

    def cdf(u):  # the tanh approximation of the standard normal CDF that IDDPM uses
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))

    inv_std = (-log_scale).exp()
    cdf_plus, cdf_min = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    # the outermost bins extend to -inf / +inf
    log_probs = torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                            torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                        (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    return log_probs


# SPEC §3.1-3.2 in EDM form: the target of D is y for every type; `delta_detach` adds (delta - sg delta) so that its
# delta-gradient matches the eps-form's, and `original` asks D to return the perturbed point's own x_0 = y + delta.
EDM_TARGETS = {
    "delta": lambda y, delta: y,
    "delta_detach": lambda y, delta: y + delta - delta.detach(),
    "original": lambda y, delta: y + delta,
}


def edm_loss(net, x, sigma, y, delta, target: str = "delta_detach", sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample EDM loss (B,) at x + delta, x = y + n, n ~ N(0, sigma^2 I) (EDM Eq. 2 and Table 1, SPEC §2.1):

        l = lambda(sigma) * mean || D_theta(x + delta; sigma) - y ||^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2
    """
    weight = sampler.expand((sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2, x)  # EDM Table 1: lambda(sigma)
    D_x = sampler.edm_denoiser(net, sigma_data)(x + delta, sigma)
    return (weight * (D_x - EDM_TARGETS[target](y, delta)) ** 2).flatten(1).mean(1)


def ddpm_batch(net, x0, alpha_bar, args, generator, t_state):
    """Draw t and eps once for the batch (SPEC §3.4 step 1); return (loss closure over delta, x_t, scale 1).

    With args.input_perturbation = gamma > 0 this is DDPM-IP (Ning et al. 2023, Alg. 1): x_t is built from the
    noise eps + gamma*xi but the regression target stays eps.
    """
    B, rows = global_rows(x0.shape[0])  # draw for the global batch, keep this rank's rows
    t, weight = sample_t(t_state, B, alpha_bar.shape[0], generator, x0.device, rows)
    eps = torch.randn((B, *x0.shape[1:]), generator=generator, device=x0.device)[rows]
    if args.input_perturbation > 0:
        # DDPM-IP, Alg. 1 line 5: y = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) (eps + gamma xi), xi ~ N(0, I)
        xi = torch.randn((B, *x0.shape[1:]), generator=generator, device=x0.device)[rows]
        x_t = sampler.q_sample(x0, t, eps + args.input_perturbation * xi, alpha_bar)
    else:
        x_t = sampler.q_sample(x0, t, eps, alpha_bar)
    first = []

    def loss_of_delta(delta):
        loss = ddpm_loss(net, x_t, t, eps, delta, alpha_bar, args.adv_target, x0)
        if t_state is not None and not first:  # IDDPM: the t-sampler learns from the clean pass's losses
            first.append(update_t_history(t_state, gather_rows(t), gather_rows(loss.detach())))
        return weight * loss

    return loss_of_delta, x_t, 1.0


def edm_batch(net, x0, alpha_bar, args, generator, t_state):
    """Draw sigma and n once (SPEC §3.4 step 1 in EDM form); scale = sqrt(1 + sigma^2) maps the VP budget (§3.6)."""
    # EDM Table 1 (training): ln sigma ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2
    B, rows = global_rows(x0.shape[0])  # draw for the global batch, keep this rank's rows
    sigma = (torch.randn(B, generator=generator, device=x0.device)[rows] * 1.2 - 1.2).exp()
    x = x0 + sampler.expand(sigma, x0) * torch.randn((B, *x0.shape[1:]), generator=generator, device=x0.device)[rows]
    # SPEC §2.2 / §3.6: a VP perturbation delta_vp is delta_e = sqrt(1 + sigma^2) delta_vp in EDM space
    scale = sampler.expand((1 + sigma**2).sqrt(), x0) if args.adv_space == "vp" else 1.0
    return (lambda delta: edm_loss(net, x, sigma, x0, delta, args.adv_target)), x, scale


BATCHES = {"ddpm": ddpm_batch, "edm": edm_batch}


def sample_t(t_state, batch_size: int, T: int, generator, device, rows=slice(None)):
    """t ~ uniform, or IDDPM's loss-second-moment importance sampling with weights 1/(T p_t) (SPEC §1.2).
    Draws batch_size values and returns the given rows of them (this rank's share under torchrun)."""
    if t_state is None:
        return torch.randint(0, T, (batch_size,), generator=generator, device=device)[rows], 1.0
    # IDDPM Sec. 3.3: p_t ~ sqrt(E[L_t^2]) over the last 10 losses, mixed with 0.1% uniform; uniform until warm
    p = (t_state["history"] ** 2).mean(1).sqrt()
    p = 0.999 * p / p.sum().clamp_min(1e-30) + 0.001 / T
    p = torch.where((t_state["count"] >= 10).all(), p, torch.full_like(p, 1 / T))
    t = torch.multinomial(p, batch_size, replacement=True, generator=generator)[rows]
    return t, 1 / (T * p[t])


def update_t_history(t_state, t, losses) -> None:
    """Ring buffer of the last 10 losses per t, on the device (no sync). Deviation: when one t appears twice in a
    batch only one of its losses is kept (IDDPM loops over samples in Python and keeps both)."""
    slot = t_state["count"][t] % 10
    t_state["history"][t, slot] = losses.to(t_state["history"].dtype)
    t_state["count"].index_add_(0, t, torch.ones_like(t))


# ----------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): PyTorch's DistributedDataParallel. Every rank draws the randomness of the whole
# global batch from the same seeded generator and keeps its own rows, so the ranks' samples never repeat each
# other, a 2-process run equals a 1-process run over the same global batch (up to the all-reduce's summation order),
# and the generator state in a checkpoint is the same on every rank (resume with any number of processes).
# Deviation: dropout masks are drawn per rank, so with dropout > 0 they differ from the 1-process run's.


# same as in cm_at.py: keep in sync
def setup_distributed(args) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): the process group from the environment (NCCL on GPU, gloo on CPU) and this
    rank's device. Returns (rank, world size); (0, 1) and no process group in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    # checked before any collective, on every rank, so that every rank exits with the message and none waits
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must be divisible by the "
                        f"{world} processes")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


# same as in cm_at.py: keep in sync
def global_rows(b: int) -> tuple[int, slice]:
    """(global batch size, this rank's rows of it) for a local batch of b; (b, all rows) in a single process."""
    if not dist.is_initialized():
        return b, slice(None)
    rank = dist.get_rank()
    return b * dist.get_world_size(), slice(rank * b, (rank + 1) * b)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The global batch's (B, ...) tensor from every rank's rows, in rank order (x itself in a single process)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# same as in cm_at.py: keep in sync
def any_rank(flag: bool, device) -> bool:
    """True on every rank when flag is true on any rank (a Ctrl-C seen by one process stops all of them)."""
    if not dist.is_initialized():
        return flag
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def fast_path(net, args):
    """The one-GPU fast path, off on CPU: TF32, cuDNN autotuning, channels_last, fused AdamW, optional torch.compile.

    Returns (network to train through: DDP-wrapped under torchrun, optimizer, autocast context for the K passes).
    """
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # shapes are fixed: cuDNN times its conv algorithms once per shape
        net.to(memory_format=torch.channels_last)
    # SPEC §1.7: AdamW, weight decay 0, constant lr; the fused kernel updates all tensors in a few launches
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, fused=on_gpu)
    train_net = net
    if dist.is_initialized():  # averages the weight gradients over ranks; delta.grad stays local (per sample)
        train_net = DistributedDataParallel(net, device_ids=[torch.device(args.device)] if on_gpu else None)
    train_net = torch.compile(train_net, mode=args.compile_mode) if args.compile else train_net
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    return train_net, opt, autocast


def to_input_layout(x0, args):
    """channels_last on CUDA (what the convolutions prefer), unchanged on CPU."""
    return x0.contiguous(memory_format=torch.channels_last) if args.device.startswith("cuda") else x0


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    # SPEC §1.7: theta_ema <- decay * theta_ema + (1 - decay) * theta, after every optimizer step
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


def free_at_step(net, ema, opt, loss_of_delta, x_noisy, args, d: int, scale=1.0):
    """SPEC §3.4 step 2 with this run's budget: K passes of attacks.free_at, each followed by an EMA update.

    scale multiplies the radius and the step (EDM space, SPEC §3.6). Returns (clean loss, last-pass loss, mean
    ||delta||) as tensors, without a host sync.
    """
    if args.adv_norm == "l2":
        # SPEC §3.3: radius eta*sqrt(d); step alpha (abs) or alpha*sqrt(d)
        # eta <= 0 means "no projection" (attacks.l2_step); keep it a plain 0 even when scale is a tensor
        radius = attacks.l2_radius(args.adv_budget, d) * scale if args.adv_budget > 0 else 0.0
        step_size = attacks.step_length(args.adv_step_size, d, args.adv_step_scale) * scale
    else:
        radius, step_size = args.adv_budget * scale, args.adv_step_size * scale
    clean, last, delta = attacks.free_at(loss_of_delta, x_noisy, opt, args.adv_steps, args.adv_norm, step_size,
                                         radius, after_update=lambda: update_ema(ema, net, args.ema_decay))
    return clean, last, attacks.per_sample_norm(delta).mean()


def train_step(net, ema, opt, x0, alpha_bar, args, generator, t_state=None):
    """One data batch in the paper's order: sample t (or sigma) and the noise, build x_t, then K free-AT passes."""
    loss_of_delta, x_noisy, scale = BATCHES[args.loss](net, x0, alpha_bar, args, generator, t_state)
    return free_at_step(net, ema, opt, loss_of_delta, x_noisy, args, x0[0].numel(), scale)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: one torch.save of plain dicts and tensors, read back with weights_only=True


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle content, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "adv-diffusion/1" or ckpt.get("kind") != "dpm":
        raise UserError(f"{path} is not a dpm_at.py checkpoint (missing format/kind keys)")
    return ckpt


@torch.no_grad()
def save_grid(ema, alpha_bar, args, path: str, shape) -> None:
    """EMA samples from a fixed seed (so grids of one run are comparable): DDIM (ddpm) or Euler (edm), sampler.py."""
    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    z = torch.randn((args.num_grid, *shape), generator=g, device=args.device)
    if args.loss == "edm":  # EDM's own deterministic sampler (SPEC §2.4), Euler to keep grids cheap
        sigmas = sampler.karras_sigmas(args.grid_steps).to(args.device)
        x = sampler.edm_sample(sampler.edm_denoiser(ema), sigmas[0] * z, sigmas, heun=False).clamp(-1, 1)
    else:
        x = sampler.ddim_sample(sampler.vp_denoiser(ema, alpha_bar), z, alpha_bar, sampler.respace(str(args.grid_steps)))
    if x.dim() == 2:  # 2-D points: one scatter image of all samples
        data.save_scatter(x, path)
    else:
        data.save_image_grid(x.cpu(), path)


def main(args: argparse.Namespace) -> None:
    args = resolve_args(args)
    if args.dry_run:
        print(json.dumps(vars(args), indent=1))
        return
    rank, world = setup_distributed(args)
    say = print if rank == 0 else lambda *a, **k: None  # rank 0 alone prints and writes files
    say(json.dumps(vars(args), indent=1))
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume is None and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: pass --resume {ckpt_path} to continue it, or choose another --out")
    resumed = load_checkpoint(args.resume) if args.resume else None
    init = load_checkpoint(args.init_from) if args.init_from else None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    torch.manual_seed(args.seed)  # init weights and dropout masks
    generator = torch.Generator(device=args.device).manual_seed(args.seed)  # data, t, eps
    images = data.load_dataset(args.dataset, args.data_dir, seed=args.seed, num_shapes=args.num_shapes)
    images = images.to(args.device)  # uint8; CIFAR-10 is 150 MB, so it can sit on the GPU

    source = resumed or init
    if source:  # the network, loss and schedule of a resumed / initialising run come from its checkpoint
        args.loss = source["loss"]
    net_config = source["net"] if source else unet.preset_config(args.preset, args.learn_sigma, None, images.shape[1],
                                                                 images.shape[-1])  # points: in_channels = d
    if args.dropout is not None:
        net_config["dropout"] = args.dropout
    schedule = source["schedule"] if source else args.schedule
    net = unet.build_from_config(net_config).to(args.device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    train_net, opt, autocast = fast_path(net, args)
    if args.compile:
        say("--compile: the first steps compile the network (a minute or more), later steps are faster")
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta(schedule)).to(args.device)
    # IDDPM's loss-second-moment history: the last 10 losses per t, and how many were seen
    t_state = dict(history=torch.zeros(alpha_bar.shape[0], 10, device=args.device),
                   count=torch.zeros(alpha_bar.shape[0], dtype=torch.long, device=args.device)) \
        if args.loss == "ddpm" and args.t_sampler == "loss-second-moment" else None
    step = 0
    if source:
        net.load_state_dict(source["model"])
        ema.load_state_dict(source["ema"] if "ema" in source else source["model"])
    if resumed:
        opt.load_state_dict(resumed["opt"])
        for group in opt.param_groups:
            group["lr"] = args.lr
        step = resumed["step"]
        if t_state is not None and resumed.get("t_state"):
            t_state = {k: v.to(args.device) for k, v in resumed["t_state"].items()}
        torch.set_rng_state(resumed["rng_cpu"])
        generator.set_state(resumed["rng_gen"])
    say(f"{type(net).__name__} {unet.count_parameters(net) / 1e6:.2f}M parameters; data {tuple(images.shape)}; "
        f"{'AT K=' + str(args.adv_steps) if args.adv_steps else 'standard training'}; from step {step}"
        + (f"; {world} processes x {args.batch_size // world} images" if world > 1 else ""))

    def checkpoint(path=ckpt_path):
        if rank > 0:  # every rank holds the same state; rank 0 writes it while the others wait
            return dist.barrier()
        save_checkpoint(path, dict(format="adv-diffusion/1", kind="dpm", loss=args.loss, net=net_config,
                                   schedule=schedule, sigma_data=0.5, t_state=t_state, model=net.state_dict(),
                                   ema=ema.state_dict(),
                                   opt=opt.state_dict(), step=step, args=vars(args), rng_cpu=torch.get_rng_state(),
                                   rng_gen=generator.get_state()))
        if world > 1:
            dist.barrier()

    # Ctrl-C: finish the current batch, save, exit. A second Ctrl-C stops at once.
    stop = []
    previous_handler = signal.signal(signal.SIGINT, lambda *a: signal.default_int_handler(*a) if stop else stop.append(1))
    sums, t_last, step_last = torch.zeros(3, device=args.device), time.time(), step
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, dynamic_ncols=True, disable=rank > 0)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    rows = global_rows(args.batch_size // world)[1]
    try:
        for step in bar:
            x0 = to_input_layout(data.random_batch(images, args.batch_size, generator)[rows], args)
            net.train()
            with autocast:
                sums += torch.stack(train_step(train_net, ema, opt, x0, alpha_bar, args, generator, t_state))
            step += 1  # counts finished batches (SPEC §3.4: K optimizer steps per batch, one step count)
            log, save, grid = (step % n == 0 or step == args.steps
                               for n in (args.log_every, args.save_every, args.grid_every))
            # a Ctrl-C that reached one process stops all of them after this same step
            if world > 1 and any_rank(bool(stop), args.device) and not stop:
                stop.append(1)
            if (log or save or grid or stop) and world > 1:  # the global batch's mean, so all ranks agree below
                dist.all_reduce(sums)
                sums /= world
            if (log or save or grid or stop) and not torch.isfinite(sums).all():  # one host sync per interval
                raise UserError(f"loss is not finite by step {step}; stopped. Last good checkpoint: {ckpt_path}")
            if log:
                n, dt = step - step_last, time.time() - t_last
                loss, adv_loss, delta_norm = (sums / n).tolist()
                rec = dict(step=step, loss=loss, adv_loss=adv_loss, delta_norm=delta_norm, lr=args.lr,
                           img_per_s=n * args.batch_size / dt, sec_per_step=dt / n)
                if rank == 0:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{loss:.4f}", adv=f"{adv_loss:.4f}", delta=f"{delta_norm:.3f}")
                sums.zero_()
                t_last, step_last = time.time(), step
            if grid and rank == 0:
                save_grid(ema, alpha_bar, args, os.path.join(args.out, f"grid_{step:07d}.png"), images.shape[1:])
            if save or stop:
                checkpoint()
            if stop:
                say(f"\ninterrupted: saved {ckpt_path} at step {step}; continue with --resume {ckpt_path}")
                sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if metrics is not None:
            metrics.close()
        bar.close()
    say(f"done: {ckpt_path} (step {step})")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (UserError, data.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
