"""Train a diffusion model (DPM) with efficient ("free") adversarial training on the noisy input x_t.

Paper: Wang et al. 2025, arXiv:2502.17099v1: distributionally robust training over a ball around q(x_t) amounts to
       adversarial training on x_t (Sec. 3-4; the AT objective, Eq. (14) in the reviews' numbering); its efficient
       AT (Sec. 4) makes K ascent steps on delta per batch, each reusing the backward pass of a weight update.
Borrowed: DDPM (Ho et al. 2020) Alg. 1 and L_simple; IDDPM (Nichol & Dhariwal 2021) learned variance, hybrid loss and
          loss-aware t-sampling; EDM (Karras et al. 2022) Table 1 loss; free AT "minibatch replay" (Shafahi et al.
          2019, Alg. 1); DDPM-IP (Ning et al. 2023, Alg. 1) as a baseline. The loop follows the authors' released
          code (cifar_adv_train.sh); docs/method.md §2-§4 has the equations in the order the code runs them.
Uses: unet.py, data.py, sampler.py, attacks.py.     Used by: nothing (cm_at.py and sampler.py read its checkpoint).

    python dpm_at.py                                        # offline demo on a CPU (generated `silhouettes`): a
                                                            # grid of samples in runs/silhouettes_at/ every 30 s
    python dpm_at.py --tiny --out runs/tiny                 # well under a minute on a CPU: watch the loop run
    python dpm_at.py --dataset cifar10                      # the paper's run: 250K clean steps, then 200K AT batches

Symbols: x_0 -> x0, eps -> eps, alpha_bar_t -> alpha_bar, perturbation delta -> delta, K -> adv_steps,
         ascent step alpha -> adv_step_size, budget eta (RMS per coordinate, radius eta*sqrt(d)) -> adv_budget.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import pickle
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

# Per-dataset defaults; explicit flags win. cifar10 = the authors' cifar_adv_train.sh (docs/method.md §4.4): batch
# 128, AdamW lr 1e-4, EMA 0.9999, clean training to 250K steps, then 200K AT batches. silhouettes (the offline
# default), shapes and points are ours, for a 2-core CPU: silhouettes and shapes train clean first (an AT batch costs
# K = 3 passes) with a large lr and a short EMA, and draw a small grid every 30 s of wall-clock time as well, so that
# the first grid comes within a minute (README, Set-up, has the times we measured).
DATASET_DEFAULTS = {
    "cifar10": dict(preset="cifar10", steps=450_000, at_start=250_000, batch_size=128, lr=1e-4, ema_decay=0.9999,
                    learn_sigma=True, t_sampler="loss-second-moment", log_every=100, grid_every=5000,
                    save_every=5000, num_grid=64, grid_steps=25, grid_seconds=0.0),
    "silhouettes": dict(preset="demo", steps=4000, at_start=3000, batch_size=16, lr=2e-3, ema_decay=0.98,
                        learn_sigma=False, t_sampler="uniform", log_every=20, grid_every=500, save_every=500,
                        num_grid=36, grid_steps=20, grid_seconds=30.0),
    "shapes": dict(preset="demo", steps=2000, at_start=1000, batch_size=16, lr=2e-3, ema_decay=0.98,
                   learn_sigma=False, t_sampler="uniform", log_every=20, grid_every=200, save_every=200, num_grid=36,
                   grid_steps=20, grid_seconds=30.0),
    # the 2-D point sets (data.POINT_SETS) train an MLP; their "grid" is a scatter image of num_grid samples
    "points": dict(preset="mlp2d", steps=3000, at_start=0, batch_size=512, lr=1e-3, ema_decay=0.995, learn_sigma=False,
                   t_sampler="uniform", log_every=100, grid_every=1000, save_every=1000, num_grid=5000, grid_steps=25,
                   grid_seconds=60.0),
}
TINY = dict(preset="tiny", steps=20, at_start=0, batch_size=8, ema_decay=0.9, log_every=5, grid_every=10,
            save_every=10, num_grid=16, num_shapes=512, grid_steps=10, grid_seconds=0.0)
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")  # torch.compile's


class UserError(Exception):
    """Bad input; the command line prints the one-line message and exits 1."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dataset", default="silhouettes", help="cifar10 | silhouettes (default; offline, 16x16) | shapes (offline) | "
                                               "2-D: ring, checkerboard | folder:PATH")
    a("--data-dir", default="./data", help="where cifar-10-python.tar.gz lives or is downloaded; default ./data")
    a("--out", default=None, help="run directory; default runs/<dataset>_<at|std>")
    a("--steps", type=int, default=None, help="data batches in all; cifar10: 450000 (200000 with --init-from)")
    a("--at-start", type=int, default=None, help="step at which AT starts (clean training before); cifar10: 250000 "
                                                 "(authors' recipe), 0 with --init-from or other data")
    a("--batch-size", type=int, default=None, help="images per batch over all torchrun processes; cifar10: 128")
    a("--lr", type=float, default=None, help="AdamW learning rate, constant; cifar10: 1e-4 (authors' script)")
    a("--ema-decay", type=float, default=None, help="EMA decay per optimizer step; cifar10: 0.9999")
    a("--preset", default=None, choices=list(unet.PRESETS), help="network (unet.PRESETS); cifar10: cifar10 (ADM)")
    a("--dropout", type=float, default=None, help="dropout; default the preset's (cifar10: 0.3)")
    a("--loss", default=None, choices=["ddpm", "edm"], help="ddpm: eps-prediction on VP x_t (DDPM Alg. 1, the "
      "paper's CIFAR-10 run); edm: EDM's preconditioned denoiser (EDM Table 1); default ddpm")
    a("--schedule", default=None, choices=["cosine", "linear"], help="VP beta schedule (IDDPM Sec. 3.2 / DDPM "
                                                                     "Sec. 4); default cosine")
    a("--diffusion-steps", type=int, default=None, help="T, the number of VP steps (DDPM Sec. 4); default 1000")
    a("--image-size", type=int, default=None,
      help="S of the (3, S, S) images (silhouettes, shapes, folder:PATH); default 16 for silhouettes, else 32")
    a("--learn-sigma", default=None, action=argparse.BooleanOptionalAction,
      help="ddpm: learned variance + hybrid loss (IDDPM Sec. 3.1); default on for cifar10, else off")
    a("--t-sampler", default=None, choices=["uniform", "loss-second-moment"],
      help="ddpm timestep sampling (IDDPM Sec. 3.3); cifar10: loss-second-moment, else uniform")
    a("--adv-steps", type=int, default=3, help="K inner passes per batch, each an optimizer step (authors' code); "
                                               "0 = standard training; default 3")
    a("--adv-step-size", type=float, default=0.1, help="ascent step alpha (authors' adv_lr); default 0.1")
    a("--adv-budget", type=float, default=0.1, help="eta >= 0: l2 radius eta*sqrt(d), or the l-inf bound (authors' "
                                                    "adv_max_norm); 0 = no projection (theirs: <= 0); default 0.1")
    a("--adv-norm", default="l2", choices=["l2", "linf"], help="perturbation ball; default l2 (the released code)")
    a("--adv-step-scale", default="abs", choices=["abs", "sqrt_d"],
      help="l2 step length alpha (abs, released code) or alpha*sqrt(d); default abs (docs/method.md §4.3)")
    a("--adv-space", default="vp", choices=["vp", "raw"], help="edm: delta is a VP-space perturbation mapped to "
      "EDM space by sqrt(1 + sigma^2) (vp) or used as is (raw) (docs/method.md §4.5); default vp")
    a("--adv-target", default="delta_detach", choices=["delta", "delta_detach", "original"],
      help="regression target under perturbation (docs/method.md §4.2); default delta_detach (authors' script)")
    a("--input-perturbation", type=float, default=0.0, help="gamma of the DDPM-IP baseline (Ning et al. 2023, "
      "Alg. 1): x_t built from eps + gamma*xi, target eps; ddpm only; 0 = off (default), that paper uses 0.1")
    a("--init-from", default=None, help="start from this checkpoint's weights (+EMA), fresh optimizer, step 0")
    a("--resume", default=None, help="continue a run from its checkpoint (weights, EMA, optimizer, step, RNG)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default cuda if available")
    # 1 thread: with one other busy process on 2 cores, a silhouettes step took 0.135 s with 1 thread and 0.489 s with
    # 2 (a shapes step: 0.30 s and 6.9 s); idle, 2 threads gained 4% (README, Set-up)
    a("--threads", type=int, default=1, help="torch CPU threads; default 1: on 2 cores shared with other jobs, 2 "
                                             "threads ran 3.6-23x slower than 1 (README, Set-up)")
    a("--precision", default=None, choices=["bf16", "fp32"],
      help="bf16 autocast (default on CUDA; weights, optimizer, EMA and delta stay fp32) or fp32 (default on CPU)")
    a("--compile", action="store_true", help="torch.compile the network (a one-time compile of a minute or more)")
    a("--compile-mode", default=None, choices=COMPILE_MODES,
      help="with --compile; default reduce-overhead (CUDA graphs) on one GPU, else default")
    a("--seed", type=int, default=0, help="seeds init, data, t, eps, dropout and the grids; default 0")
    a("--num-shapes", type=int, default=None,
      help="size of the generated silhouettes / shapes set; default 10000 (--tiny: 512)")
    a("--log-every", type=int, default=None, help="steps between log lines / metrics.jsonl records")
    a("--grid-every", type=int, default=None, help="steps between PNG sample grids (EMA model, fixed seed)")
    a("--grid-seconds", type=float, default=None, help="also a grid when this many seconds have passed since the "
                                                       "last one; 0 = off; silhouettes, shapes: 30, cifar10: 0")
    a("--save-every", type=int, default=None, help="steps between checkpoints (ckpt.pt, written atomically)")
    a("--num-grid", type=int, default=None, help="images per grid")
    a("--grid-steps", type=int, default=None, help="DDPM ancestral (ddpm) or Euler (edm) steps for the grids; "
                                                   "default 25 (silhouettes, shapes: 20)")
    a("--tiny", action="store_true", help="tiny UNet, tiny data, few steps: see the loop run on a laptop CPU")
    a("--dry-run", action="store_true", help="print the resolved config and exit")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: the flags given on the command line
        action.default = argparse.SUPPRESS
    args.explicit = sorted(vars(p.parse_args(argv)))
    args.argv = argv
    return args


NOT_RESUMED = ("resume", "init_from", "out", "device", "precision", "compile", "compile_mode", "dry_run", "explicit",
               "argv", "threads")


def adopt_checkpoint(args: argparse.Namespace, ckpt: dict, path: str, resume: bool) -> None:
    """--init-from: the network, loss, schedule and T come from the checkpoint. --resume: every setting of the run
    too; a flag given now that changes the run (--steps 5000 extends it) is applied with a one-line note. A flag that
    contradicts the network, loss, schedule, T (or, on resume, the data) is refused in one line, so that args.json
    records what is actually trained."""
    net = ckpt["net"]
    saved = dict(at_start=0)  # runs made before --at-start existed trained AT from their first batch
    saved.update(ckpt["args"], loss=ckpt["loss"], schedule=ckpt["schedule"], image_size=net.get("image_size"),
                 diffusion_steps=ckpt.get("diffusion_steps", 1000),  # files written before T was a flag: 1000
                 learn_sigma=net["out_channels"] == 2 * net["in_channels"])
    fixed = ("loss", "schedule", "preset", "learn_sigma", "diffusion_steps", "image_size") + \
        (("dataset",) if resume else ())
    for key in fixed:
        if key in args.explicit and getattr(args, key) != saved.get(key):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts {path}, which was trained "
                            f"with {saved.get(key)}; drop the flag")
    keys = [k for k in saved if k in vars(args) and k not in NOT_RESUMED] if resume else fixed
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {saved[k]})" for k in keys
               if k in args.explicit and getattr(args, k) != saved[k]]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: resuming {path} with its settings, except {', '.join(changed)}")
    for key in keys:
        if key not in args.explicit:
            setattr(args, key, saved.get(key))


def positive(v) -> bool:
    return 0 < v < math.inf


# Every numeric flag and its range; one line names the flag and the range when a value falls outside it.
RANGES = dict(steps=(lambda v: v >= 1, ">= 1"), at_start=(lambda v: v >= 0, ">= 0"),
              batch_size=(lambda v: v >= 1, ">= 1"), lr=(positive, "> 0 and finite"),
              ema_decay=(lambda v: 0 <= v < 1, "in [0, 1)"), dropout=(lambda v: 0 <= v < 1, "in [0, 1)"),
              diffusion_steps=(lambda v: v >= 2, ">= 2"), image_size=(lambda v: v >= 8, ">= 8"),
              adv_steps=(lambda v: v >= 0, ">= 0 (0 = standard training)"),
              adv_step_size=(lambda v: 0 <= v < math.inf, ">= 0 and finite (0 = replay: K passes on the clean x_t)"),
              adv_budget=(lambda v: 0 <= v < math.inf, ">= 0 and finite (0 = no projection)"),
              input_perturbation=(lambda v: 0 <= v < math.inf, ">= 0 and finite (0 = off)"),
              seed=(lambda v: 0 <= v < 2**63, "in [0, 2**63)"), threads=(lambda v: v >= 1, ">= 1"),
              num_shapes=(lambda v: v >= 1, ">= 1"), log_every=(lambda v: v >= 1, ">= 1"),
              grid_every=(lambda v: v >= 1, ">= 1"), save_every=(lambda v: v >= 1, ">= 1"),
              num_grid=(lambda v: v >= 1, ">= 1"), grid_seconds=(lambda v: 0 <= v < math.inf, ">= 0 (0 = off)"))


def check_ranges(args: argparse.Namespace) -> None:
    for key, (ok, text) in RANGES.items():
        value = getattr(args, key)
        if value is not None and not ok(value):
            raise UserError(f"--{key.replace('_', '-')} must be {text}, got {value}")
    if not 1 <= args.grid_steps <= args.diffusion_steps:
        raise UserError(f"--grid-steps must lie in 1..T = {args.diffusion_steps}, got {args.grid_steps}")


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before anything is built."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device} is not a device name; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu, or install the CUDA "
                        f"build of torch on a machine with a GPU (README, Set-up)")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: the trainers run on cpu or cuda")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the dataset's defaults (then --tiny's); explicit flags always win. Then check every
    value, so that a bad one stops the command before anything is built or written."""
    family = "points" if args.dataset in data.POINT_SETS else args.dataset if args.dataset in DATASET_DEFAULTS \
        else "cifar10"  # folder:PATH and imagenet64:DIR train with the cifar10 recipe
    defaults = dict(DATASET_DEFAULTS[family], **(TINY if args.tiny else {}), loss="ddpm", schedule="cosine",
                    diffusion_steps=1000, image_size=data.default_image_size(args.dataset))
    if family == "points":
        defaults["preset"] = "mlp2d"  # --tiny keeps the MLP
    if args.init_from:  # fine-tuning a clean model: AT from the first batch, for the AT part of the schedule
        defaults.update(steps=defaults["steps"] - defaults["at_start"], at_start=0)
    defaults.setdefault("num_shapes", 10000)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.dirname(args.resume) if args.resume else \
            os.path.join("runs", f"{args.dataset.split(':')[0]}_{'at' if args.adv_steps > 0 else 'std'}")
    check_ranges(args)
    if args.input_perturbation > 0 and args.loss != "ddpm":
        raise UserError("--input-perturbation belongs to --loss ddpm (DDPM-IP is an eps-loss recipe)")
    if (family == "points") != (unet.PRESETS[args.preset].get("arch") == "mlp"):
        raise UserError(f"--preset {args.preset} does not fit --dataset {args.dataset} (2-D points need mlp2d)")
    if family == "cifar10" and args.dataset == "cifar10" and args.image_size != 32:
        raise UserError(f"--image-size {args.image_size}: CIFAR-10 images are 32x32")
    if args.loss == "edm":  # learned variance and the loss-aware t-sampler belong to the VP/DDPM loss only
        explicit = getattr(args, "explicit", ())
        if ("learn_sigma" in explicit and args.learn_sigma) or \
                ("t_sampler" in explicit and args.t_sampler != "uniform"):
            raise UserError("--learn-sigma and --t-sampler loss-second-moment belong to --loss ddpm")
        args.learn_sigma, args.t_sampler = False, "uniform"
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    one_gpu = args.device.startswith("cuda") and "RANK" not in os.environ  # CUDA graphs: untested under torchrun
    args.compile_mode = args.compile_mode or ("reduce-overhead" if one_gpu else "default")
    return args


def data_shape(dataset: str, image_size: int | None) -> tuple:
    """The shape of one training sample, known before the data is loaded: (2,) for points, else (3, S, S)."""
    if dataset in data.POINT_SETS:
        return (2,)
    size = image_size or data.default_image_size(dataset)
    return (3, 32, 32) if dataset == "cifar10" else (3, size, size)


def summary(args) -> str:
    """The one start-up line: what runs, and where its outputs go (every setting is in args.json)."""
    at = f"AT K={args.adv_steps} from step {args.at_start}" if args.adv_steps else "no AT"
    grids = f"every {args.grid_every} steps" + (f" and {args.grid_seconds:g} s" if args.grid_seconds else "")
    return (f"dpm_at: {args.dataset}, {args.loss} ({args.preset}), {args.steps} steps of batch {args.batch_size}, "
            f"{at}, on {args.device}; outputs in {args.out}/: args.json, metrics.jsonl, grid_*.png ({grids}), ckpt.pt")


def check_paths(args) -> None:
    """Every path of the command, before any work: the run folder can be made, the data folder exists."""
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {args.out} is a file; give a folder for the run")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
        raise UserError(f"cannot create the run folder {args.out}: {parent} is not a writable folder")
    kind, _, folder = args.dataset.partition(":")
    if args.dataset not in ("cifar10", "silhouettes", "shapes", *data.POINT_SETS) and not (
            kind in ("folder", "imagenet64") and folder):
        raise UserError(f"unknown --dataset {args.dataset!r}; choose cifar10, silhouettes, shapes, folder:PATH, "
                        f"imagenet64:DIR, {' or '.join(data.POINT_SETS)}")
    if kind in ("folder", "imagenet64") and not os.path.isdir(folder):
        raise UserError(f"{kind} folder {folder!r} (--dataset {args.dataset}) does not exist")
    if args.dataset == "cifar10" and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir} is a file; give the folder of cifar-10-python.tar.gz")


# ---- The losses at a perturbed input x_t + delta (docs/method.md §4.1-4.2) -------------------------------------
def ddpm_loss(net, x0, x_t, t, eps, delta, alpha_bar, target: str = "delta_detach") -> torch.Tensor:
    """Per-sample AT loss (B,) at x_t + delta (Wang et al. 2025, the AT objective; docs/method.md §4.1):

        l = mean || eps + delta / sqrt(1 - alpha_bar_t) - eps_theta(x_t + delta, t) ||^2
    eps + delta/sqrt(1 - alpha_bar_t) is the noise that takes x0 to x_t + delta; with delta = 0 this is DDPM's
    L_simple (Ho et al. 2020, Eq. 14). Targets `delta` and `delta_detach` differ only in the gradient w.r.t. delta;
    `original` drops the shift. A learned-variance network ([eps, v] output) adds L_vb (IDDPM Sec. 3.1, hybrid loss).
    """
    s = sampler.expand((1 - alpha_bar.to(x_t.device)[t]).sqrt(), x_t)  # (B, 1, 1, 1)
    out = net(x_t + delta, t.to(x_t.dtype))
    eps_hat, v = out[:, : x_t.shape[1]], out[:, x_t.shape[1]:]
    shift = {"delta": delta / s, "delta_detach": delta.detach() / s, "original": 0.0}[target]
    loss = (eps + shift - eps_hat).pow(2).flatten(1).mean(1)
    if v.shape[1] == 0:
        return loss
    # the posterior is conditioned on x_t + delta (delta), sg(x_t + delta) (delta_detach) or x_t (original)
    x_cond = {"delta": x_t + delta, "delta_detach": (x_t + delta).detach(), "original": x_t}[target]
    # IDDPM Sec. 3.1: L_vb sees the mean through a frozen eps (it trains only the variance), weighted by T/1000 as
    # improved-diffusion's RESCALED_MSE loss does (gaussian_diffusion.py, training_losses): 1 at T = 1000
    T = alpha_bar.shape[0]
    return loss + T / 1000 * vb_term(x0, x_cond, t, eps_hat.detach(), v, alpha_bar)


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
    kl = 0.5 * (-1 + model_log_var - lbt + (lbt - model_log_var).exp()  # KL of two Gaussians, per coordinate
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
    return torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                       torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                   (cdf_plus - cdf_min).clamp(min=1e-12).log()))


def edm_loss(net, x0, x_t, sigma, eps, delta, target: str = "delta_detach", sigma_data: float = 0.5,
             adv_space: str = "vp") -> torch.Tensor:
    """Per-sample EDM loss (B,) at x_t + delta_e, x_t = x0 + sigma*eps (EDM Eq. 2 and Table 1; docs/method.md §4.5):

        l = lambda(sigma) * mean || D_theta(x_t + delta_e; sigma) - x0 ||^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2
    delta is a VP-space perturbation: x_e = x_vp / sqrt(alpha_bar) maps it to delta_e = sqrt(1 + sigma^2) delta
    (adv_space "vp", so one ball serves both losses), or delta_e = delta ("raw").
    """
    weight = sampler.expand((sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2, x_t)  # EDM Table 1: lambda
    delta_e = sampler.expand((1 + sigma**2).sqrt(), x_t) * delta if adv_space == "vp" else delta
    D_x = sampler.edm_denoiser(net, sigma_data)(x_t + delta_e, sigma)
    # the target is x0 for every type; delta_detach adds (delta_e - sg delta_e), whose delta-gradient matches the
    # eps form's; original asks D for the perturbed point's own x_0 = x0 + delta_e
    shifted = {"delta": x0, "delta_detach": x0 + delta_e - delta_e.detach(), "original": x0 + delta_e}[target]
    return (weight * (D_x - shifted) ** 2).flatten(1).mean(1)


# ---- Drawing the noise level and the noise (docs/method.md §2.6, §3.1) -----------------------------------------
def ddpm_noise(x0, generator, alpha_bar, t_state=None, input_perturbation: float = 0.0):
    """t (uniform, or IDDPM's loss-aware sampler) and eps ~ N(0, I); x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (DDPM
    Eq. 4). Returns (x_t, t, eps, weight): weight = 1/(T p_t) importance weights, 1.0 for uniform t.
    DDPM-IP (Ning et al. 2023, Alg. 1 line 5) builds x_t from eps + gamma*xi but keeps eps as the target."""
    t, weight = sample_t(t_state, x0.shape[0], alpha_bar.shape[0], generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    noise = eps + input_perturbation * torch.randn(x0.shape, generator=generator, device=x0.device) \
        if input_perturbation > 0 else eps
    return sampler.q_sample(x0, t, noise, alpha_bar), t, eps, weight


def edm_noise(x0, generator):
    """EDM Table 1 (training): ln sigma ~ N(P_mean, P_std^2) with P_mean = -1.2, P_std = 1.2; x_t = x0 + sigma*eps.
    Returns (x_t, sigma, eps, weight 1.0)."""
    sigma = (torch.randn(x0.shape[0], generator=generator, device=x0.device) * 1.2 - 1.2).exp()
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    return x0 + sampler.expand(sigma, x0) * eps, sigma, eps, 1.0


def make_t_state(T: int, device) -> dict:
    """IDDPM's loss-second-moment history: the last 10 losses of every t, and how many losses each t has seen.
    Deviation: under torchrun each process keeps its own history, fed by its own samples (IDDPM gathers every
    process's losses); each history still sees a uniform share of the data."""
    return dict(history=torch.zeros(T, 10, device=device), count=torch.zeros(T, dtype=torch.long, device=device))


def sample_t(t_state, batch_size: int, T: int, generator, device):
    """t ~ U{0..T-1}, or IDDPM's loss-second-moment importance sampling with weights 1/(T p_t) (IDDPM Sec. 3.3)."""
    if t_state is None:
        return torch.randint(0, T, (batch_size,), generator=generator, device=device), 1.0
    # IDDPM Sec. 3.3: p_t ~ sqrt(E[L_t^2]) over the last 10 losses, mixed with 0.1% uniform; uniform until warm
    p = (t_state["history"] ** 2).mean(1).sqrt()
    p = 0.999 * p / p.sum().clamp_min(1e-30) + 0.001 / T
    p = torch.where((t_state["count"] >= 10).all(), p, torch.full_like(p, 1 / T))
    t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
    return t, 1 / (T * p[t])


def update_t_history(t_state, t, losses) -> None:
    """Record each sample's loss under its t, in batch order, as IDDPM's per-sample loop does, with no host sync.
    A t that occurs n times in the batch fills n consecutive ring slots; if n > 10 only its last 10 losses stay."""
    T = t_state["count"].shape[0]
    same = t[:, None] == t[None, :]  # (B, B)
    earlier, later = same.tril(-1).sum(1), same.triu(1).sum(1)  # occurrences of t_i before / after sample i
    slot = (t_state["count"][t] + earlier) % 10
    row = torch.where(later < 10, t, T)  # overwritten within this batch: park in a spare row, dropped below
    history = torch.cat([t_state["history"], t_state["history"][:1]])
    history[row, slot] = losses.to(history.dtype)
    t_state["history"].copy_(history[:T])
    t_state["count"].index_add_(0, t, torch.ones_like(t))


def make_losses(loss: str, alpha_bar, generator, *, t_state=None, adv_target: str = "delta_detach",
                adv_space: str = "vp", input_perturbation: float = 0.0):
    """The run's (noise_fn, loss_fn) pair for train_step, chosen once: "ddpm" (eps on VP x_t) or "edm"."""
    if loss == "edm":
        return (functools.partial(edm_noise, generator=generator),
                functools.partial(edm_loss, target=adv_target, adv_space=adv_space))
    return (functools.partial(ddpm_noise, generator=generator, alpha_bar=alpha_bar, t_state=t_state,
                              input_perturbation=input_perturbation),
            functools.partial(ddpm_loss, alpha_bar=alpha_bar, target=adv_target))


# ---- The algorithm: one data batch of efficient adversarial training -------------------------------------------
@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    # theta_ema <- decay * theta_ema + (1 - decay) * theta after every optimizer step (authors' code); decay 0 copies
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


def train_step(net, ema, opt, x0, noise_fn, loss_fn, *, adv_steps: int = 3, adv_step_size: float = 0.1,
               adv_budget: float = 0.1, adv_norm: str = "l2", adv_step_scale: str = "abs", ema_decay: float = 0.9999,
               t_state=None):
    """One data batch of free AT (Wang et al. 2025, Sec. 4, as the authors' code runs it; docs/method.md §4.4).

    noise_fn(x0) -> (x_t, level, eps, weight) and loss_fn(net, x0, x_t, level, eps, delta) -> (B,) come from
    make_losses. adv_steps = K passes, each one optimizer step; K = 0 is standard training (one pass, delta = 0).
    Returns (clean loss, last pass's loss, mean ||delta||) as 0-dim tensors, without a host sync.
    """
    # 1. Draw t (or sigma) and the noise once; x0, t, eps and x_t stay fixed for all K passes.
    x_t, level, eps, weight = noise_fn(x0)
    # 2. The ball: radius eta*sqrt(d) (l2) or eta per coordinate (linf); the released step is alpha, not scaled.
    d = x0[0].numel()
    radius, step_size = attacks.ball(adv_norm, adv_budget, adv_step_size, d, adv_step_scale)
    delta = torch.zeros_like(x_t)  # delta starts at 0 on every batch: pass 0 sees the clean x_t
    n_pass = max(adv_steps, 1)
    for k in range(n_pass):
        ascend = k < n_pass - 1  # the last delta is used once, never updated
        delta.requires_grad_(ascend)
        opt.zero_grad(set_to_none=True)
        # 3. Forward at x_t + delta (dropout active: a fresh mask on every pass).
        losses = loss_fn(net, x0, x_t, level, eps, delta)  # (B,)
        loss = (weight * losses).mean()
        # 4. The "free" reuse (Shafahi et al. 2019): this ONE backward gives both the weight gradient (p.grad) and the
        #    gradient w.r.t. delta (delta.grad), both at the current weights.
        loss.backward()
        if t_state is not None:  # IDDPM's t-sampler learns from every pass's losses, as the authors' loop feeds it
            update_t_history(t_state, level, losses.detach())
        if k == 0:
            clean_loss = loss.detach()
        # 5. Inner max: one normalised ascent step on delta, then projection onto the ball (PGD, Madry et al. 2018).
        if ascend:
            step = attacks.STEPS[adv_norm]
            delta = step(delta.detach(), delta.grad, step_size, radius)
        # 6. Outer min: one optimizer step with the weight gradient of this same backward, then the EMA.
        opt.step()
        update_ema(ema, net, ema_decay)
    return clean_loss, loss.detach(), attacks.per_sample_norm(delta.detach()).mean()


# ---- Checkpoints (one torch.save of plain dicts and tensors), grids, GPU fast path, torchrun -------------------
def checkpoint_state(args, net_config: dict, net, ema, opt, step: int, generator, t_state) -> dict:
    """The checkpoint that cm_at.py and sampler.py read, plus the optimizer, step and RNG states --resume needs."""
    return dict(format="adv-diffusion/1", kind="dpm", loss=args.loss, net=net_config, schedule=args.schedule,
                diffusion_steps=args.diffusion_steps, sigma_data=0.5, t_state=t_state, model=net.state_dict(),
                ema=ema.state_dict(), opt=opt.state_dict(),
                step=step, args=vars(args), rng_cpu=torch.get_rng_state(), rng_gen=generator.get_state(),
                rng_cuda=cuda_rng(args.device))


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: torch.save to path.tmp (a fixed name, so a killed run leaves nothing that piles up), then
    one rename. A failed write (disk full) removes the temp file and leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = f"the previous {path} is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"cannot write {path} ({str(e).splitlines()[0][:200]}); {kept}") from None


def load_checkpoint(path: str, preset: str | None = None, diffusion_steps: int | None = None,
                    schedule: str | None = None, image_size: int | None = None, resume: bool = False) -> dict:
    """A dpm_at.py checkpoint, or (for --init-from) a published improved-/guided-diffusion state dict converted to
    one by sampler.adm_checkpoint (preset names its layout; T and schedule default to the preset's); else a
    one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses objects that could run code on load
        raise UserError(f"cannot read checkpoint {path}: it holds objects other than tensors and plain containers, "
                        f"which we do not unpickle (they could run code); use a ckpt.pt of this repository") from None
    except Exception as e:  # truncated file, not a torch file, ...
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); it is "
                        f"damaged or not a checkpoint of this repository") from None
    if unet.is_adm_state_dict(ckpt):  # a published ADM / IDDPM file: weights only, no optimizer or step
        if resume:
            raise UserError(f"{path} is a published state dict (weights only): start from it with --init-from")
        if preset is None:
            raise UserError(f"{path} is a raw improved-/guided-diffusion state dict: name its layout with --preset "
                            f"(cifar10, iddpm-cifar10 or iddpm-imagenet64)")
        try:
            return sampler.adm_checkpoint(ckpt, preset, diffusion_steps, schedule, image_size)
        except sampler.SamplerError as e:
            raise UserError(f"{path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "adv-diffusion/1" or ckpt.get("kind") != "dpm":
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} is not a dpm_at.py checkpoint" + (f" (it holds a {found!r} model)" if found else ""))
    missing = [k for k in ("net", "model", "args", "loss", "schedule", "step") if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it is incomplete; use a ckpt.pt written by dpm_at.py")
    check_weights(ckpt, path, [k for k in ("model", "ema") if k in ckpt])
    return ckpt


# same as in cm_at.py: keep in sync
def check_weights(ckpt: dict, path: str, keys) -> None:
    """The state dicts ckpt[key] fit the network config ckpt["net"] (names and shapes), checked on the meta device:
    nothing is allocated, so a 57M-parameter file costs nothing to check."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in unet.build_from_config(ckpt["net"]).state_dict().items()}
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: its network config cannot be built ({e})") from None
    for key in keys:
        state = ckpt[key]
        got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        wrong = sorted(set(expected) ^ set(got)) + [k for k in expected if k in got and got[k] != expected[k]]
        if wrong:
            raise UserError(f"the {key!r} weights in {path} do not fit its network config (first mismatch: "
                            f"{wrong[0]}); the file was edited or mixes two runs")


def check_fits_data(net: dict, shape: tuple, path: str, dataset: str) -> None:
    """The checkpoint's network takes samples of this data's shape: (2,) points need the MLP, (3, S, S) images a
    UNet built for S."""
    if len(shape) == 1:
        fits, holds = net.get("arch") == "mlp" and net.get("in_channels") == shape[0], "an image UNet"
    else:
        fits = net.get("arch", "unet") == "unet" and net.get("in_channels") == shape[0] and \
            net.get("image_size") == shape[-1]
        holds = "a 2-D point MLP" if net.get("arch") == "mlp" else \
            f"a UNet for {net.get('in_channels')}x{net.get('image_size')}x{net.get('image_size')} images"
    if not fits:
        raise UserError(f"{path} holds {holds}, but --dataset {dataset} has samples of shape {shape}; use a "
                        f"checkpoint trained on this data")


def grid_due(step: int, args, last_step: int, seconds: float, cost: float) -> bool:
    """A grid at the last step; every grid_every steps, unless the last grid (at last_step) came less than a quarter
    of that before; and when grid_seconds have passed since it, unless grids would then take more than a fifth of the
    time (cost: the last grid's seconds; on a busy CPU a grid can take longer than the steps between them)."""
    due = step % args.grid_every == 0 and step - last_step > args.grid_every // 4
    late = args.grid_seconds > 0 and seconds >= max(args.grid_seconds, 4 * cost)
    return due or step == args.steps or late


@torch.no_grad()
def save_grid(ema, alpha_bar, loss: str, path: str, shape, num: int, steps: int, seed: int) -> None:
    """EMA samples from a fixed seed (and fixed noise), so that the grids of one run are comparable: DDPM ancestral
    with the fixed_small variance (ddpm) or Euler (edm). Written to grid.tmp.png (a fixed name) and renamed; a failed
    write removes it and stops the run in one line."""
    device = next(ema.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    z = torch.randn((num, *shape), generator=generator, device=device)
    if loss == "edm":  # EDM's deterministic sampler (EDM Alg. 1), Euler to keep grids cheap
        sigmas = sampler.karras_sigmas(steps).to(device)
        x = sampler.edm_sample(sampler.edm_denoiser(ema), sigmas[0] * z, sigmas, heun=False).clamp(-1, 1)
    else:  # DDPM Alg. 2 with beta~ (IDDPM's fixed_small): on `shapes` after 200-400 steps DDIM's deterministic path
        # (and fixed_large's last-step noise) left most images speckled, ancestral fixed_small drew clean shapes
        x = sampler.ddpm_sample(sampler.vp_denoiser(ema, alpha_bar), z, alpha_bar,
                                sampler.respace(str(steps), len(alpha_bar)), generator, variance="fixed_small")
    tmp = os.path.join(os.path.dirname(path), "grid.tmp.png")
    try:
        if x.dim() == 2:
            data.save_scatter(x.cpu(), tmp)
        else:  # 16x16 silhouettes are shown at 32x32 (nearest neighbour)
            data.save_image_grid(x.cpu(), tmp, scale=data.grid_scale(x.shape[-1]))
        os.replace(tmp, path)
    except (OSError, data.DatasetError) as e:  # data.py words an OSError as "cannot write TMP (reason)"
        reason = str(e).split(" (", 1)[-1].rstrip(")") if isinstance(e, data.DatasetError) else str(e)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"cannot write {path} ({reason[:200]}); the earlier grids and checkpoint "
                        f"are intact") from None


def fast_path(net, device: str, lr: float, compile_mode: str | None = None):
    """The one-GPU fast path, off on CPU: TF32, cuDNN autotuning, channels_last, fused AdamW, optional torch.compile.
    Returns (network to train through, AdamW optimizer)."""
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its conv algorithms once per shape
        net.to(memory_format=torch.channels_last)
    # authors' script: AdamW, weight decay 0, constant lr; the fused kernel updates all tensors in a few launches
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, fused=on_gpu)
    return (torch.compile(net, mode=compile_mode) if compile_mode else net), opt


def cuda_rng(device: str):
    """The GPU's RNG state (it draws the dropout masks there), saved so that a resumed run continues exactly."""
    return torch.cuda.get_rng_state(device) if "cuda" in device else None


def setup_ddp(args) -> tuple[int, int]:
    """torchrun, the nanoGPT way: one process per GPU (gloo on CPU), each with its own seed and local batch.
    Returns (rank, world size); (0, 1) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1
    world = int(os.environ["WORLD_SIZE"])
    if args.batch_size % world:  # checked on every rank before any collective, so that none waits
        raise UserError(f"--batch-size {args.batch_size} is the global batch: it must divide by {world} processes")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def ddp_any(flag: bool, device) -> bool:
    """True on every process if it is true on any (a Ctrl-C seen by one process stops them all)."""
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def main(args: argparse.Namespace) -> None:
    # Everything is checked before anything is built or written: a refused command leaves no run folder behind.
    source_path = args.resume or args.init_from
    source = load_checkpoint(source_path, args.preset, args.diffusion_steps, args.schedule, args.image_size,
                             resume=bool(args.resume)) if source_path else None
    if args.resume and [k for k in ("ema", "opt", "rng_cpu", "rng_gen") if k not in source]:
        raise UserError(f"{args.resume} lacks the optimizer or RNG state --resume needs; start from its weights with "
                        f"--init-from {args.resume} instead")
    if source:
        adopt_checkpoint(args, source, source_path, resume=bool(args.resume))
        check_fits_data(source["net"], data_shape(args.dataset, args.image_size), source_path, args.dataset)
    args = resolve_args(args)
    check_device(args.device)  # here, not in resolve_args: the resolved config can be inspected on any machine
    check_paths(args)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume is None and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: pass --resume {ckpt_path} to continue it, or choose another --out")
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(vars(args), indent=1) if args.dry_run else summary(args))
    if args.dry_run:
        return
    torch.set_num_threads(args.threads)
    rank, world = setup_ddp(args)
    torch.manual_seed(args.seed + rank)  # init weights (overwritten from rank 0 by DDP) and dropout masks
    generator = torch.Generator(device=args.device).manual_seed(args.seed + rank)  # data, t, eps: per process
    images = data.load_dataset(args.dataset, args.data_dir, seed=args.seed, num_shapes=args.num_shapes,
                               image_size=args.image_size)
    images = images.to(args.device)  # uint8; CIFAR-10 is 150 MB, so it can sit on the GPU
    net_config = source["net"] if source else unet.preset_config(args.preset, args.learn_sigma, None,
                                                                 images.shape[1], images.shape[-1])
    net_config.update({} if args.dropout is None else dict(dropout=args.dropout))
    net = unet.build_from_config(net_config).to(args.device)
    train_net, opt = fast_path(net, args.device, args.lr, args.compile_mode if args.compile else None)
    if world > 1:  # copies rank 0's weights to all; averages weight gradients; delta.grad stays local (per sample)
        train_net = DistributedDataParallel(train_net, device_ids=[args.device] if "cuda" in args.device else None)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta(args.schedule, args.diffusion_steps)).to(args.device)
    t_state = make_t_state(len(alpha_bar), args.device) if args.t_sampler == "loss-second-moment" else None
    step = load_state(source, args, net, ema, opt, generator, t_state, rank)
    noise_fn, loss_fn = make_losses(args.loss, alpha_bar, generator, t_state=t_state, adv_target=args.adv_target,
                                    adv_space=args.adv_space, input_perturbation=args.input_perturbation)
    log = Logger(args, rank, step)
    log.say(f"{unet.count_parameters(net) / 1e6:.2f}M parameters; data {tuple(images.shape)}; starting at step "
            f"{step}; {world} process(es)")
    last_grid, grid_cost, grid_step = time.time(), 0.0, step
    ctrl_c = []  # Ctrl-C: finish the batch, save, exit (under torchrun: all at the next log step); twice: stop at once
    signal.signal(signal.SIGINT, lambda *a: signal.default_int_handler(*a) if ctrl_c else ctrl_c.append(1))
    for step in tqdm(range(step + 1, args.steps + 1), initial=step, total=args.steps, disable=rank > 0):
        x0 = data.random_batch(images, args.batch_size // world, generator)
        x0 = x0.contiguous(memory_format=torch.channels_last) if "cuda" in args.device and x0.dim() == 4 else x0
        if step == args.at_start + 1 and args.at_start > 0 and args.adv_steps > 0:  # AT starts from the clean
            opt.state.clear()  # model with a fresh AdamW state, as the authors' fine-tuning script does
        with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.precision == "bf16"):
            log.add(train_step(train_net.train(), ema, opt, x0, noise_fn, loss_fn, adv_step_size=args.adv_step_size,
                               adv_budget=args.adv_budget, adv_norm=args.adv_norm, adv_step_scale=args.adv_step_scale,
                               ema_decay=args.ema_decay, t_state=t_state,
                               adv_steps=args.adv_steps if step > args.at_start else 0))
        stop = bool(ctrl_c) if world == 1 else step % args.log_every == 0 and ddp_any(bool(ctrl_c), args.device)
        if step % args.log_every == 0 or step == args.steps or stop:
            log.write(step, opt.param_groups[0]["lr"])  # one host sync; stops on a non-finite loss
        elif step % args.save_every == 0:
            log.check(step)  # never save non-finite weights
        if rank == 0 and grid_due(step, args, grid_step, time.time() - last_grid, grid_cost):
            start = time.time()
            save_grid(ema, alpha_bar, args.loss, os.path.join(args.out, f"grid_{step:07d}.png"), images.shape[1:],
                      args.num_grid, args.grid_steps, args.seed)
            last_grid, grid_cost, grid_step = time.time(), time.time() - start, step
        if rank == 0 and (step % args.save_every == 0 or step == args.steps or stop):
            save_checkpoint(ckpt_path, checkpoint_state(args, net_config, net, ema, opt, step, generator, t_state))
        if stop:
            log.say(f"\ninterrupted: saved {ckpt_path} at step {step}; continue with --resume {ckpt_path}")
            sys.exit(130)
    log.say(f"done: {ckpt_path} (step {args.steps})")


def load_state(source, args, net, ema, opt, generator, t_state, rank: int) -> int:
    """Weights (+EMA) from --init-from or --resume; from --resume also the optimizer, step, t-sampler and RNG.
    Returns the step to continue from (0 for a new or --init-from run)."""
    if source is None:
        return 0
    net.load_state_dict(source["model"])
    ema.load_state_dict(source.get("ema", source["model"]))
    if not args.resume:
        return 0
    opt.load_state_dict(source["opt"])
    for group in opt.param_groups:
        group["lr"] = args.lr
    if t_state is not None and source.get("t_state"):
        for key, value in source["t_state"].items():
            t_state[key].copy_(value)
    if "RANK" in os.environ:  # rank 0's RNG state was saved: each process reseeds from (seed, rank, step) instead
        torch.manual_seed(args.seed + rank + 1_000_003 * source["step"])
        generator.manual_seed(args.seed + rank + 1_000_003 * source["step"])
    else:  # one process continues exactly where it stopped
        torch.set_rng_state(source["rng_cpu"])
        generator.set_state(source["rng_gen"])
        if source.get("rng_cuda") is not None and "cuda" in args.device:  # dropout masks on the GPU
            torch.cuda.set_rng_state(source["rng_cuda"], args.device)
    return source["step"]


class Logger:
    """Rank 0's log: loss sums stay on the device between log steps (no host sync per step); at a log step their
    mean over the steps and the processes goes to metrics.jsonl and one printed line. args.json (the settings being
    trained) is written first, and args_history.jsonl gains one {time, step, argv, args} line per start."""

    def __init__(self, args, rank: int, step: int):
        self.args, self.rank, self.sums, self.step, self.time = args, rank, 0, step, time.time()
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            for name in os.listdir(args.out):  # temp files of a killed run (older versions named them .tmp<pid>)
                if name.startswith(("ckpt.pt.tmp", "grid.tmp.png", "args.json.tmp")):
                    os.remove(os.path.join(args.out, name))
            settings = {k: v for k, v in vars(args).items() if k != "argv"}
            record = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), step=step, argv=args.argv, args=settings)
            path = os.path.join(args.out, "args.json")
            self.append(os.path.join(args.out, "args_history.jsonl"), json.dumps(record))
            try:
                with open(path + ".tmp", "w") as f:
                    json.dump(settings, f, indent=1)
                os.replace(path + ".tmp", path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.remove(path + ".tmp")
                raise UserError(f"cannot write {path} ({e}); the earlier files in {args.out} are intact") from None

    def append(self, path: str, line: str) -> None:
        """Append one line; a failed write cuts the file back to its old length and stops the run in one line."""
        size = os.path.getsize(path) if os.path.exists(path) else 0
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise UserError(f"cannot write {path} ({e}); its earlier lines and {self.args.out}/ckpt.pt are "
                            f"intact") from None

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text)

    def add(self, losses) -> None:
        self.sums = self.sums + torch.stack(losses)

    def check(self, step: int) -> list:
        """The mean (loss, adv loss, ||delta||) since the last log step over all processes; a non-finite loss stops
        the run on every process, so the checkpoint on disk stays the last good one."""
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
        means = (sums / (step - self.step)).tolist()
        if not math.isfinite(means[0] + means[1]):
            raise UserError(f"loss is not finite by step {step}; stopped. Last good checkpoint: "
                            f"{os.path.join(self.args.out, 'ckpt.pt')}")
        return means

    def write(self, step: int, lr: float) -> None:
        (loss, adv_loss, delta_norm), dt = self.check(step), time.time() - self.time
        n = step - self.step
        if self.rank == 0:
            self.append(os.path.join(self.args.out, "metrics.jsonl"), json.dumps(dict(
                step=step, loss=loss, adv_loss=adv_loss, delta_norm=delta_norm, lr=lr,
                img_per_s=n * self.args.batch_size / dt, sec_per_step=dt / n)))
            tqdm.write(f"step {step}: loss {loss:.4g}, adv {adv_loss:.4g}, |delta| {delta_norm:.3f}, "
                       f"{dt / n:.2f} s/step")
        self.sums, self.step, self.time = 0, step, time.time()


def cli(argv=None) -> int:
    """The command line: bad input ends in one `error:` line on stderr and exit code 1, never a traceback."""
    try:
        main(parse_args(argv))
    except (UserError, data.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
