"""Consistency distillation (CD) of a diffusion teacher, with efficient ("free") adversarial training on the
student's noisy input.

Paper: Wang et al. 2025, arXiv:2502.17099v1: AT for consistency models mirrors AT for DPMs (Sec. 4, the AT
       objective applied to the consistency loss). Its CM recipe was not released; docs/method.md §5.4 says what we
       chose (delta shifts the student's input only; the teacher step and the target stay clean).
Borrowed: consistency distillation, boundary scalings and the N-point Karras grid (Song et al. 2023, "Consistency
          Models", Alg. 2, Eq. 7, App. C); EDM's Heun/Euler ODE step (Karras et al. 2022, Alg. 1); the pseudo-Huber
          distance (Song & Dhariwal 2023, "Improved Techniques for Training CMs", Sec. 3.3); free AT minibatch replay
          (Shafahi et al. 2019, Alg. 1) with the loop of the authors' DPM code, as in dpm_at.py.
Uses: unet.py, data.py, sampler.py, attacks.py, a dpm_at.py teacher.   Used by: nothing (sampler.py reads its output).

    python dpm_at.py --loss edm --adv-steps 0 --out runs/sil_edm                    # a teacher first (silhouettes)
    python cm_at.py --teacher runs/sil_edm/ckpt.pt --tiny                           # about a minute on a CPU
    python cm_at.py --teacher runs/c10_edm/ckpt.pt --dataset cifar10 --out runs/c10_cd_at   # CIFAR-10 (CM Table 3)

Symbols: x_0 -> x0, z -> z, grid t_0 > ... > t_{N-1} -> sigmas, t_i -> sigma_hi, t_{i+1} -> sigma_lo, student
         f_theta -> f, target f_theta- -> f_target, teacher D_phi -> teacher, target rate mu -> target_decay,
         perturbation delta -> delta, K -> adv_steps, ascent step alpha -> adv_step_size, budget eta -> adv_budget.

A ddpm (VP, eps-prediction) teacher is a valid teacher, but its weights are only a loose start for the student,
whose F is conditioned the EDM way (c_in, c_noise = ln(sigma)/4 in sampler.consistency_fn); an edm teacher's F fits.
"""
import argparse
import contextlib
import copy
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

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # the Karras grid's ends (CM App. C takes EDM's)

# Per-dataset defaults; explicit flags win. cifar10 = the CM paper's CIFAR-10 CD run (CM App. C): batch 512, RAdam
# lr 4e-4, eval-EMA 0.9999, 800K iterations. silhouettes and shapes (ours): a few minutes on a CPU, short eval-EMA.
DATASET_DEFAULTS = {
    "cifar10": dict(steps=800_000, batch_size=512, lr=4e-4, ema_decay=0.9999, num_shapes=10000,
                    log_every=100, grid_every=5000, save_every=5000, num_grid=64),
    "shapes": dict(steps=1000, batch_size=32, lr=2e-4, ema_decay=0.99, num_shapes=10000,
                   log_every=25, grid_every=250, save_every=250, num_grid=64),
}
TINY = dict(steps=20, batch_size=4, ema_decay=0.9, log_every=5, grid_every=10, save_every=10, num_grid=16,
            num_shapes=512)


class UserError(Exception):
    """Bad input; the command line prints the one-line message and exits 1."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--teacher", default=None, help="diffusion checkpoint from dpm_at.py (its EMA weights teach and initialise "
                                      "the student); on --resume the saved path is the default")
    a("--dataset", default="silhouettes", help="cifar10 | silhouettes, shapes (offline, generated) | folder:PATH; "
                                               "default silhouettes (dpm_at.py's default)")
    a("--data-dir", default="./data", help="where cifar-10-python.tar.gz lives or is downloaded; default ./data")
    a("--out", default=None, help="run directory; default runs/<dataset>_cd_<at|std>")
    a("--steps", type=int, default=None, help="data batches in all (the step counter); cifar10: 800000")
    a("--batch-size", type=int, default=None, help="images per batch over all torchrun processes; cifar10: 512")
    a("--lr", type=float, default=None, help="RAdam learning rate, constant; cifar10: 4e-4 (CM App. C)")
    a("--ema-decay", type=float, default=None, help="eval-EMA decay per optimizer step; cifar10: 0.9999")
    a("--target-decay", type=float, default=0.0, help="mu: target net theta- <- mu theta- + (1 - mu) theta per "
                                                      "optimizer step; default 0 = sg(theta) (CM App. C, CIFAR-10)")
    a("--num-scales", type=int, default=18, help="N points of the Karras grid (EDM Eq. 5); default 18 (CIFAR-10)")
    a("--solver", default="heun", choices=["heun", "euler"], help="teacher ODE step (CM Alg. 2); default heun")
    a("--distance", default="l2", choices=["l2", "pseudo_huber"],
      help="d(f, f_target): l2 = per-pixel mean square (CM Sec. 3) or pseudo_huber (iCT Sec. 3.3); default l2")
    a("--dropout", type=float, default=None, help="student dropout; default the teacher's")
    a("--adv-steps", type=int, default=3, help="K inner passes per batch, each an optimizer step (as dpm_at.py); "
                                               "0 = plain CD; default 3")
    a("--adv-step-size", type=float, default=0.1, help="ascent step alpha (as dpm_at.py); default 0.1")
    a("--adv-budget", type=float, default=0.1, help="eta >= 0: l2 radius eta*sqrt(d), or the l-inf bound; 0 = no "
                                                    "projection; default 0.1")
    a("--adv-norm", default="l2", choices=["l2", "linf"], help="perturbation ball; default l2 (as dpm_at.py)")
    a("--adv-step-scale", default="abs", choices=["abs", "sqrt_d"],
      help="l2 step length alpha (abs, the released DPM code) or alpha*sqrt(d); default abs")
    a("--adv-space", default="vp", choices=["vp", "raw"], help="delta is a VP-space perturbation mapped to EDM "
      "space by sqrt(1 + sigma_hi^2) (vp) or used as is (raw) (docs/method.md §4.5); default vp")
    a("--resume", default=None, help="continue a run from its checkpoint (weights, EMA, target, optimizer, step, RNG)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default cuda if available")
    a("--threads", type=int, default=1, help="torch CPU threads; default 1 (as dpm_at.py: README, Set-up)")
    a("--seed", type=int, default=0, help="seeds data, sigma indices, z, dropout and the grids; default 0")
    a("--num-shapes", type=int, default=None,
      help="size of the generated silhouettes / shapes set; default 10000 (--tiny: 512)")
    a("--log-every", type=int, default=None, help="steps between log lines / metrics.jsonl records")
    a("--grid-every", type=int, default=None, help="steps between PNG grids (1- and 2-step samples, EMA student)")
    a("--save-every", type=int, default=None, help="steps between checkpoints (ckpt.pt, written atomically)")
    a("--num-grid", type=int, default=None, help="images per grid")
    a("--tiny", action="store_true", help="tiny data, batch and step count: see the loop run on a laptop CPU")
    a("--dry-run", action="store_true", help="print the resolved config and exit")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: the flags given on the command line
        action.default = argparse.SUPPRESS
    args.explicit = sorted(vars(p.parse_args(argv)))
    args.argv = argv
    return args


NOT_RESUMED = ("resume", "out", "device", "dry_run", "explicit", "argv", "threads")


def adopt_checkpoint(args: argparse.Namespace, ckpt: dict, path: str) -> None:
    """--resume: every setting of the run comes from the checkpoint; a flag given now that changes the run (--steps
    5000 extends it) is applied with a one-line note; a flag that changes the grid or the data is refused."""
    saved = dict(ckpt["args"], num_scales=ckpt["num_scales"])
    for key in ("num_scales", "dataset"):
        if key in args.explicit and getattr(args, key) != saved.get(key):
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts {path}, which was trained "
                            f"with {saved.get(key)}; drop the flag")
    keys = [k for k in saved if k in vars(args) and k not in NOT_RESUMED]
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {saved[k]})" for k in keys
               if k in args.explicit and getattr(args, k) != saved[k]]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: resuming {path} with its settings, except {', '.join(changed)}")
    for key in keys:
        if key not in args.explicit:
            setattr(args, key, saved[key])


def positive(v) -> bool:
    return 0 < v < math.inf


# Every numeric flag and its range; one line names the flag and the range when a value falls outside it.
RANGES = dict(steps=(lambda v: v >= 1, ">= 1"), batch_size=(lambda v: v >= 1, ">= 1"),
              lr=(positive, "> 0 and finite"), ema_decay=(lambda v: 0 <= v < 1, "in [0, 1)"),
              target_decay=(lambda v: 0 <= v < 1, "in [0, 1)"), num_scales=(lambda v: v >= 2, ">= 2"),
              dropout=(lambda v: 0 <= v < 1, "in [0, 1)"), adv_steps=(lambda v: v >= 0, ">= 0 (0 = plain CD)"),
              adv_step_size=(lambda v: 0 <= v < math.inf, ">= 0 and finite (0 = replay: K passes on the clean x)"),
              adv_budget=(lambda v: 0 <= v < math.inf, ">= 0 and finite (0 = no projection)"),
              seed=(lambda v: 0 <= v < 2**63, "in [0, 2**63)"), threads=(lambda v: v >= 1, ">= 1"),
              num_shapes=(lambda v: v >= 1, ">= 1"), log_every=(lambda v: v >= 1, ">= 1"),
              grid_every=(lambda v: v >= 1, ">= 1"), save_every=(lambda v: v >= 1, ">= 1"),
              num_grid=(lambda v: v >= 1, ">= 1"))


# same as in dpm_at.py: keep in sync
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
    """Fill unset flags from the dataset's defaults (then --tiny's); explicit flags always win."""
    # silhouettes and shapes share the CPU recipe; folder:PATH trains with the cifar10 recipe
    family = "shapes" if args.dataset in ("silhouettes", "shapes") else "cifar10"
    for key, value in dict(DATASET_DEFAULTS[family], **(TINY if args.tiny else {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.teacher is None and args.resume is None:
        raise UserError("--teacher PATH (a dpm_at.py checkpoint) is required")
    if args.out is None:
        args.out = os.path.dirname(args.resume) if args.resume else \
            os.path.join("runs", f"{args.dataset.split(':')[0]}_cd_{'at' if args.adv_steps > 0 else 'std'}")
    for key, (ok, text) in RANGES.items():
        value = getattr(args, key)
        if value is not None and not ok(value):
            raise UserError(f"--{key.replace('_', '-')} must be {text}, got {value}")
    out = os.path.abspath(args.out)  # the run folder can be made (as dpm_at.check_paths)
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(out) and not os.path.isdir(out) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot use {args.out} as the run folder: it is a file, or {parent} is not writable")
    if args.dataset.startswith("folder:") and not os.path.isdir(args.dataset[len("folder:"):]):
        raise UserError(f"image folder {args.dataset[len('folder:'):]} does not exist")
    return args


# ---- The teacher's ODE step and the consistency loss (docs/method.md §5.2) -------------------------------------
@torch.no_grad()
def teacher_step(teacher, x_hi, sigma_hi, sigma_lo, heun: bool = True) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma from sigma_hi down to sigma_lo.

    EDM Alg. 1 / CM Alg. 2: Euler, plus Heun's trapezoidal correction (sigma_lo >= sigma_min > 0 on the CD grid).
    sigma_hi, sigma_lo: (B,); x_hi: (B, C, H, W).
    """
    s_hi, s_lo = sampler.expand(sigma_hi, x_hi), sampler.expand(sigma_lo, x_hi)  # (B, 1, 1, 1)
    d = (x_hi - teacher(x_hi, sigma_hi)) / s_hi
    x_lo = x_hi + (s_lo - s_hi) * d
    if heun:
        d_lo = (x_lo - teacher(x_lo, sigma_lo)) / s_lo
        x_lo = x_hi + (s_lo - s_hi) * (d + d_lo) / 2
    return x_lo


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # CM Sec. 3 ("l2"): per-pixel mean of the squared difference, per sample (B,)
    return (a - b).pow(2).flatten(1).mean(1)


def pseudo_huber_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # iCT Sec. 3.3: sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d), per sample (B,)
    c = 0.00054 * a[0].numel() ** 0.5
    return ((a - b).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


# Deviation: no LPIPS (the CM paper's CIFAR-10 choice): it needs downloaded VGG weights. We offer l2 (the CM paper's
# pixel metric) and iCT's pseudo-Huber, which iCT found to close most of the gap to LPIPS.
DISTANCES = {"l2": l2_distance, "pseudo_huber": pseudo_huber_distance}


def cd_loss(f, f_target, x_hi, delta, x_lo, sigma_hi, sigma_lo, distance: str = "l2") -> torch.Tensor:
    """Per-sample CD-AT loss (B,) (CM Eq. 7 with uniform weight; the AT form of docs/method.md §5.4):

        l = d( f_theta(x_hi + delta, sigma_hi), sg f_theta-(x_lo, sigma_lo) )
    delta shifts only the student's input; the target is the clean one, as x_0 is unchanged in the DPM form.
    """
    dropout_rng = torch.cuda if x_hi.device.type == "cuda" else torch  # draws nn.Dropout's masks on this device
    state = dropout_rng.get_rng_state()
    online = f(x_hi + delta, sigma_hi)
    # As the CM reference code: the target pass replays the online pass's dropout masks (no-op without dropout).
    dropout_rng.set_rng_state(state)
    with torch.no_grad():  # sg: no gradient through the target net or into delta from it
        target = f_target(x_lo, sigma_lo)
    return DISTANCES[distance](online, target)


# ---- The algorithm: one data batch of consistency distillation with free AT (as dpm_at.train_step) -------------
# same as in dpm_at.py: keep in sync
@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    # theta_ema <- decay * theta_ema + (1 - decay) * theta after every optimizer step (authors' code); decay 0 copies
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


def train_step(student, target, ema, opt, teacher, x0, sigmas, generator, *, adv_steps: int = 3,
               adv_step_size: float = 0.1, adv_budget: float = 0.1, adv_norm: str = "l2", adv_step_scale: str = "abs",
               adv_space: str = "vp", distance: str = "l2", heun: bool = True, target_decay: float = 0.0,
               ema_decay: float = 0.9999, sigma_data: float = 0.5):
    """One data batch of CD + free AT. teacher(x, sigma) is the teacher's denoiser D_phi; sigmas the N-point grid.
    Returns (clean loss, last pass's loss, mean ||delta|| in VP units) as 0-dim tensors, without a host sync."""
    # 1. Draw the grid index i ~ U{0..N-2} and z (CM Alg. 2); x_hi = x0 + t_i z. All stay fixed for the K passes.
    i = torch.randint(0, len(sigmas) - 1, (x0.shape[0],), generator=generator, device=x0.device)
    sigma_hi, sigma_lo = sigmas[i], sigmas[i + 1]  # (B,) float64
    x_hi = x0 + sampler.expand(sigma_hi, x0) * torch.randn(x0.shape, generator=generator, device=x0.device)
    # 2. The teacher's ODE step runs once, on the clean x_hi: under AT the target stays the clean one.
    x_lo = teacher_step(teacher, x_hi, sigma_hi, sigma_lo, heun)
    f = sampler.consistency_fn(student, SIGMA_MIN, sigma_data)
    f_target = sampler.consistency_fn(target, SIGMA_MIN, sigma_data)
    # 3. The ball in VP units, as dpm_at.py; with adv_space "vp" delta enters EDM space as sqrt(1 + sigma^2) delta.
    d = x0[0].numel()
    radius, step_size = attacks.ball(adv_norm, adv_budget, adv_step_size, d, adv_step_scale)
    scale = sampler.expand((1 + sigma_hi**2).sqrt(), x0).float() if adv_space == "vp" else 1.0
    delta = torch.zeros_like(x_hi)
    n_pass = max(adv_steps, 1)
    for k in range(n_pass):
        ascend = k < n_pass - 1
        delta.requires_grad_(ascend)
        opt.zero_grad(set_to_none=True)
        # 4. The student at x_hi + delta; the target pass is rerun every pass, since theta- moves after each step.
        loss = cd_loss(f, f_target, x_hi, scale * delta, x_lo, sigma_hi, sigma_lo, distance).mean()
        # 5. The "free" reuse (Shafahi et al. 2019): this ONE backward gives the student's weight gradient and the
        #    gradient w.r.t. delta, both at the current weights.
        loss.backward()
        if k == 0:
            clean_loss = loss.detach()
        # 6. Inner max: a normalised ascent step on delta and the projection onto the ball (PGD, Madry et al. 2018).
        if ascend:
            step = attacks.STEPS[adv_norm]
            delta = step(delta.detach(), delta.grad, step_size, radius)
        # 7. Outer min: one optimizer step, then the target net (rate mu, CM Alg. 2) and the eval-EMA.
        opt.step()
        update_ema(target, student, target_decay)
        update_ema(ema, student, ema_decay)
    return clean_loss, loss.detach(), attacks.per_sample_norm(delta.detach()).mean()


# ---- Teacher, student, checkpoints (one torch.save of plain dicts and tensors), grids, torchrun ----------------
def checkpoint_state(args, net_config: dict, student, ema, target, opt, step: int, generator, sigma_data) -> dict:
    """The checkpoint that sampler.py reads (net, EMA, the grid), plus what --resume needs (target, optimizer, RNG)."""
    return dict(format="adv-diffusion/1", kind="cm", loss="cd", net=net_config, model=student.state_dict(),
                ema=ema.state_dict(), target=target.state_dict(), opt=opt.state_dict(), step=step, args=vars(args),
                num_scales=args.num_scales, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=sigma_data,
                teacher=str(args.teacher), rng_cpu=torch.get_rng_state(), rng_gen=generator.get_state(),
                rng_cuda=cuda_rng(args.device))


# same as in dpm_at.py: keep in sync
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


# What each kind of checkpoint must hold for this command: a teacher its EMA weights and schedule, a run to resume
# every state of the loop.
NEEDS = {"dpm": ("net", "ema", "loss", "schedule"),
         "cm": ("net", "model", "ema", "target", "opt", "step", "args", "num_scales", "teacher", "rng_cpu", "rng_gen")}


def load_checkpoint(path: str, kind: str) -> dict:
    """A checkpoint of this kind ("dpm": a dpm_at.py teacher, "cm": a cm_at.py run), else a one-line UserError.
    The keys this command needs and the weights' shapes are checked here, before anything is built or written."""
    name = {"dpm": "dpm_at.py", "cm": "cm_at.py"}[kind]
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != "adv-diffusion/1" or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} is not a {name} checkpoint" + (f" (it holds a {found!r} model)" if found else "")
                        + ("; the teacher must be a diffusion model trained by dpm_at.py" if kind == "dpm" else ""))
    missing = [k for k in NEEDS[kind] if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it is incomplete; use a ckpt.pt written by {name}")
    if ckpt["net"].get("arch", "unet") != "unet":
        raise UserError(f"{path} holds a 2-D point MLP; consistency distillation here needs an image UNet")
    check_weights(ckpt, path, [k for k in ("model", "ema", "target") if k in ckpt])
    return ckpt


# same as in dpm_at.py: keep in sync
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


def load_teacher(ckpt: dict, device: str):
    """The teacher's denoiser D_phi(x; sigma) from its EMA weights, frozen, in eval mode (CM Alg. 2)."""
    if ckpt.get("loss") not in ("edm", "ddpm"):
        raise UserError(f"the teacher's loss is {ckpt.get('loss')!r}; cm_at.py distils 'edm' or 'ddpm' models")
    net = unet.build_from_config(ckpt["net"])
    net.load_state_dict(ckpt["ema"])  # shapes checked by load_checkpoint
    net = net.to(device).eval().requires_grad_(False)
    gpu_layout(device, net)
    if ckpt["loss"] == "edm":
        return sampler.edm_denoiser(net, ckpt.get("sigma_data", 0.5))
    # EDM Sec. 2 / App. C.1: the VP eps-network as a denoiser; sigma picks the nearest of its T steps (files written
    # before T was stored have T = 1000)
    beta = sampler.make_beta(ckpt["schedule"], ckpt.get("diffusion_steps", 1000))
    return sampler.vp_denoiser(net, sampler.alpha_bar_from_beta(beta).to(device))


def student_from_teacher(ckpt: dict, dropout: float | None = None):
    """UNet kwargs and initial weights of the student: the teacher's EMA weights (CM Sec. 6, initialised from the
    teacher). The student outputs C channels; a learned-sigma teacher's [eps, v] output keeps its first C."""
    C = ckpt["net"]["in_channels"]
    net_config = dict(ckpt["net"], out_channels=C, **({} if dropout is None else dict(dropout=dropout)))
    net_config.pop("time_scale", None)  # IDDPM's t * 1000 / T belongs to the teacher's VP labels, not to c_noise
    state = dict(ckpt["ema"])
    state["out_conv.weight"], state["out_conv.bias"] = state["out_conv.weight"][:C], state["out_conv.bias"][:C]
    return net_config, state


@torch.no_grad()
def save_grids(ema, sigmas, out: str, step: int, shape, num: int, seed: int, sigma_data: float) -> None:
    """1-step and 2-step consistency samples of the EMA student from a fixed seed (CM Alg. 1, sampler.py)."""
    f = sampler.consistency_fn(ema, SIGMA_MIN, sigma_data)
    device = sigmas.device
    for n_steps in (1, 2):
        g = torch.Generator(device=device).manual_seed(seed + 1)
        z = torch.randn((num, *shape), generator=g, device=device)
        # the same evenly spread indices as `python sampler.py --sampler consistency --steps n`
        indices = [round(k * (len(sigmas) - 1) / n_steps) for k in range(n_steps + 1)]
        x = sampler.consistency_sample(f, z, sigmas, indices, g, SIGMA_MIN)
        path, tmp = os.path.join(out, f"grid_{step:07d}_{n_steps}step.png"), os.path.join(out, "grid.tmp.png")
        try:  # a fixed temp name, renamed; a failed write removes it and stops the run in one line
            data.save_image_grid(x.cpu(), tmp, scale=data.grid_scale(x.shape[-1]))
            os.replace(tmp, path)
        except (OSError, data.DatasetError) as e:  # data.py words an OSError as "cannot write TMP (reason)"
            reason = str(e).split(" (", 1)[-1].rstrip(")") if isinstance(e, data.DatasetError) else str(e)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise UserError(f"cannot write {path} ({reason[:200]}); the earlier grids and "
                            f"checkpoint are intact") from None


# same as in dpm_at.py: keep in sync
def cuda_rng(device: str):
    """The GPU's RNG state (it draws the dropout masks there), saved so that a resumed run continues exactly."""
    return torch.cuda.get_rng_state(device) if "cuda" in device else None


# same as in dpm_at.py: keep in sync
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


# same as in dpm_at.py: keep in sync
def ddp_any(flag: bool, device) -> bool:
    """True on every process if it is true on any (a Ctrl-C seen by one process stops them all)."""
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def main(args: argparse.Namespace) -> None:
    # Everything is checked before anything is built or written: a refused command leaves no run folder behind.
    source = load_checkpoint(args.resume, "cm") if args.resume else None
    if source:
        adopt_checkpoint(args, source, args.resume)
    args = resolve_args(args)
    check_device(args.device)  # here, not in resolve_args: the resolved config can be inspected on any machine
    teacher_ckpt = load_checkpoint(args.teacher, "dpm")
    if source and any(source["net"].get(k) != teacher_ckpt["net"].get(k) for k in ("in_channels", "image_size")):
        raise UserError(f"{args.resume} was distilled for other images than the teacher {args.teacher} makes")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume is None and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: pass --resume {ckpt_path} to continue it, or choose another --out")
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(vars(args), indent=1) if args.dry_run else
              f"cm_at: {args.dataset}, teacher {args.teacher}, {args.steps} steps of batch {args.batch_size}, AT K="
              f"{args.adv_steps}, on {args.device}; outputs in {args.out}/: args.json, metrics.jsonl, grid_*.png, "
              f"ckpt.pt")
    if args.dry_run:
        return
    torch.set_num_threads(args.threads)
    rank, world = setup_ddp(args)
    torch.manual_seed(args.seed + rank)  # dropout masks
    generator = torch.Generator(device=args.device).manual_seed(args.seed + rank)  # data, sigma indices, z
    images = data.load_dataset(args.dataset, args.data_dir, seed=args.seed, num_shapes=args.num_shapes,
                               image_size=teacher_ckpt["net"]["image_size"]).to(args.device)
    teacher = load_teacher(teacher_ckpt, args.device)
    sigma_data = teacher_ckpt.get("sigma_data", 0.5)
    net_config, state = (source["net"], source["model"]) if source else student_from_teacher(teacher_ckpt, args.dropout)
    student = unet.build_from_config(net_config).to(args.device)
    student.load_state_dict(state)
    # The target net starts as the student and runs in train mode, as the online pass (same dropout masks).
    ema, target = copy.deepcopy(student).eval().requires_grad_(False), copy.deepcopy(student).requires_grad_(False)
    gpu_layout(args.device, student, ema, target)
    opt = torch.optim.RAdam(student.parameters(), lr=args.lr)  # CM App. C (CIFAR-10): RAdam, constant lr
    train_student = student if world == 1 else DistributedDataParallel(  # averages weight gradients over processes
        student, device_ids=[args.device] if "cuda" in args.device else None)
    sigmas = sampler.karras_sigmas(args.num_scales, SIGMA_MIN, SIGMA_MAX)[:-1].to(args.device)  # drop t_N = 0
    step = load_state(source, args, ema, target, opt, generator, rank)
    at = dict(adv_steps=args.adv_steps, adv_step_size=args.adv_step_size, adv_step_scale=args.adv_step_scale,
              adv_budget=args.adv_budget, adv_norm=args.adv_norm, adv_space=args.adv_space, heun=args.solver == "heun",
              distance=args.distance, target_decay=args.target_decay, ema_decay=args.ema_decay, sigma_data=sigma_data)
    log = Logger(args, rank, step)
    log.say(f"{unet.count_parameters(student) / 1e6:.2f}M parameters; teacher loss {teacher_ckpt['loss']}; data "
            f"{tuple(images.shape)}; N = {args.num_scales}; starting at step {step}; {world} process(es)")
    if step == 0 and rank == 0:  # the student before distillation: the teacher's F under the consistency scalings
        save_grids(ema, sigmas, args.out, 0, images.shape[1:], args.num_grid, args.seed, sigma_data)
    ctrl_c = []  # Ctrl-C: finish the batch, save, exit (under torchrun: all at the next log step); twice: stop at once
    signal.signal(signal.SIGINT, lambda *a: signal.default_int_handler(*a) if ctrl_c else ctrl_c.append(1))
    for step in tqdm(range(step + 1, args.steps + 1), initial=step, total=args.steps, disable=rank > 0):
        x0 = data.random_batch(images, args.batch_size // world, generator)
        x0 = x0.contiguous(memory_format=torch.channels_last) if "cuda" in args.device else x0
        log.add(train_step(train_student.train(), target.train(), ema, opt, teacher, x0, sigmas, generator, **at))
        stop = bool(ctrl_c) if world == 1 else step % args.log_every == 0 and ddp_any(bool(ctrl_c), args.device)
        if step % args.log_every == 0 or step == args.steps or stop:
            log.write(step, args.lr)  # one host sync; stops on a non-finite loss
        elif step % args.save_every == 0:
            log.check(step)  # never save non-finite weights
        if rank == 0 and (step % args.grid_every == 0 or step == args.steps):
            save_grids(ema, sigmas, args.out, step, images.shape[1:], args.num_grid, args.seed, sigma_data)
        if rank == 0 and (step % args.save_every == 0 or step == args.steps or stop):
            save_checkpoint(ckpt_path, checkpoint_state(args, net_config, student, ema, target, opt, step, generator,
                                                        sigma_data))
        if stop:
            log.say(f"\ninterrupted: saved {ckpt_path} at step {step}; continue with --resume {ckpt_path}")
            sys.exit(130)
    log.say(f"done: {ckpt_path} (step {args.steps})")


def gpu_layout(device: str, *nets: torch.nn.Module) -> None:
    """CUDA only: cuDNN autotuning and channels_last weights. The arithmetic stays fp32 (no bf16): the CD loss is the
    small difference of two network outputs at neighbouring noise levels. Nothing changes on CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its conv algorithms once per shape
        for net in nets:
            net.to(memory_format=torch.channels_last)


def load_state(resumed, args, ema, target, opt, generator, rank: int) -> int:
    """From --resume: EMA, target net, optimizer, step and RNG (the student's weights are loaded by main)."""
    if resumed is None:
        return 0
    ema.load_state_dict(resumed["ema"])
    target.load_state_dict(resumed["target"])
    opt.load_state_dict(resumed["opt"])
    for group in opt.param_groups:
        group["lr"] = args.lr
    if "RANK" in os.environ:  # rank 0's RNG state was saved: each process reseeds from (seed, rank, step) instead
        torch.manual_seed(args.seed + rank + 1_000_003 * resumed["step"])
        generator.manual_seed(args.seed + rank + 1_000_003 * resumed["step"])
    else:  # one process continues exactly where it stopped
        torch.set_rng_state(resumed["rng_cpu"])
        generator.set_state(resumed["rng_gen"])
        if resumed.get("rng_cuda") is not None and "cuda" in args.device:  # dropout masks on the GPU
            torch.cuda.set_rng_state(resumed["rng_cuda"], args.device)
    return resumed["step"]


# same as in dpm_at.py: keep in sync
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
