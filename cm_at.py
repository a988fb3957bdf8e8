"""Consistency distillation (CD) of a diffusion teacher, with efficient ("free") adversarial training on the
student's noisy input.

Paper: Wang et al. 2025, arXiv:2502.17099v1; AT for consistency models "mirrors" AT for DPMs (Sec. 4, the AT
       objective Eq. (14) applied to the consistency loss); its CM recipe was not released, see ../shared/SPEC.md §4.4.
Borrowed: consistency distillation, boundary scalings and the N-step Karras grid (Song et al. 2023, "Consistency
          Models", Alg. 2, Eq. 7, App. C); EDM's Heun/Euler ODE step (Karras et al. 2022, Alg. 1); the pseudo-Huber
          distance (Song & Dhariwal 2023, "Improved Techniques for Training CMs", Sec. 3.3); free AT minibatch replay
          (Shafahi et al. 2019, Alg. 1) with the loop semantics of the authors' DPM code (SPEC §3.4).
Uses: unet.py, data.py, sampler.py, attacks.py.     Used by: nothing (its checkpoint is read by sampler.py;
      the teacher is a checkpoint written by dpm_at.py: the checkpoint dict, not that code, is the contract).

    python dpm_at.py --dataset shapes --loss edm --adv-steps 0 --out runs/shapes_edm         # a teacher first
    python cm_at.py --teacher runs/shapes_edm/ckpt.pt --dataset shapes --tiny                # under a minute on CPU
    python cm_at.py --teacher runs/shapes_edm/ckpt.pt --dataset shapes --adv-steps 0         # plain CD on shapes
    python cm_at.py --teacher runs/c10_edm/ckpt.pt --dataset cifar10 --out runs/c10_cd_at    # CIFAR-10 (SPEC §4.2)
    torchrun --nproc_per_node=4 cm_at.py --teacher runs/c10_edm/ckpt.pt --dataset cifar10 --out runs/c10_cd_at

Symbols: x_0 -> x0 (the paper's y in EDM form), z -> z, grid t_0 > ... > t_{N-1} -> sigmas, t_i -> sigma_hi,
         t_{i+1} -> sigma_lo, student f_theta -> f, target f_theta- -> f_target, teacher D_phi -> denoise,
         target rate mu -> target_decay, perturbation delta -> delta, K -> adv_steps, ascent step alpha ->
         adv_step_size, budget eta (RMS per coordinate, radius eta*sqrt(d)) -> adv_budget.

A ddpm (VP, eps-prediction) teacher is a valid teacher, but its weights are only a loose start for the student,
whose F is conditioned the EDM way (c_in, c_noise = ln(sigma)/4 in sampler.consistency_fn); an edm teacher's F fits.
"""
import argparse
import copy
import json
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

# SPEC §2.3 / §4.2: the Karras grid's ends (CM App. C uses EDM's sigma_min and sigma_max)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

# Per-dataset defaults; explicit flags win. cifar10 = the CM paper's CIFAR-10 CD run (SPEC §4.2): batch 512, RAdam
# lr 4e-4, eval-EMA 0.9999, 800K iterations. shapes / tiny are ours [PROJECT]: a few minutes on a CPU, with a short
# eval-EMA so that the grids show progress.
DATASET_DEFAULTS = {
    "cifar10": dict(steps=800_000, batch_size=512, lr=4e-4, ema_decay=0.9999,
                    log_every=100, grid_every=5000, save_every=5000, num_grid=64),
    "shapes": dict(steps=1000, batch_size=32, lr=2e-4, ema_decay=0.99,
                   log_every=25, grid_every=250, save_every=250, num_grid=64),
}
TINY = dict(steps=20, batch_size=4, ema_decay=0.9, log_every=5, grid_every=10, save_every=10, num_grid=16,
            num_shapes=512)


class UserError(Exception):
    """Bad input; main prints the one-line message and exits 1."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--teacher", default=None, help="diffusion checkpoint from dpm_at.py (its EMA weights teach and initialise "
                                      "the student); on --resume the saved path is the default")
    a("--dataset", default="shapes", help="cifar10 | shapes (offline, generated) | folder:PATH; default shapes")
    a("--data-dir", default="./data", help="where cifar-10-python.tar.gz lives or is downloaded; default ./data")
    a("--out", default=None, help="run directory; default runs/<dataset>_cd_<at|std>")
    a("--steps", type=int, default=None, help="data batches to train on (the step counter); cifar10: 800000")
    a("--batch-size", type=int, default=None, help="images per batch, over all torchrun processes; cifar10: 512 "
                                                   "(SPEC §4.2)")
    a("--lr", type=float, default=None, help="RAdam learning rate, constant; cifar10: 4e-4 (SPEC §4.2)")
    a("--ema-decay", type=float, default=None, help="eval-EMA decay per optimizer step; cifar10: 0.9999 (SPEC §4.2)")
    a("--target-decay", type=float, default=0.0, help="mu: target net theta- <- mu theta- + (1 - mu) theta per "
                                                      "optimizer step; default 0 = sg(theta) (SPEC §4.2, CIFAR-10)")
    a("--num-scales", type=int, default=18, help="N points of the Karras grid (SPEC §2.3); default 18 (CIFAR-10)")
    a("--solver", default="heun", choices=["heun", "euler"], help="teacher ODE step (SPEC §4.2); default heun")
    a("--distance", default="l2", choices=list(DISTANCES),
      help="d(f, f_target): l2 = per-pixel mean square (SPEC §4.2) or pseudo_huber (iCT Sec. 3.3); default l2")
    a("--dropout", type=float, default=None, help="student dropout; default the teacher's")
    a("--adv-steps", type=int, default=3, help="K inner passes per batch, each an optimizer step (SPEC §3.4, §4.4); "
                                                "0 = plain CD; default 3")
    a("--adv-step-size", type=float, default=0.1, help="ascent step alpha (SPEC §3.3 adv_lr); default 0.1")
    a("--adv-budget", type=float, default=0.1, help="eta: l2 radius eta*sqrt(d) (SPEC §3.3 adv_max_norm); "
                                                    "default 0.1")
    a("--adv-space", default="vp", choices=["vp", "raw"],
      help="radius and step mapped from VP space by sqrt(1 + sigma_hi^2) (vp) or as is (raw) (SPEC §3.6); default vp")
    a("--resume", default=None, help="continue a run from its checkpoint (weights, EMA, target, optimizer, step, RNG)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default cuda if available")
    a("--seed", type=int, default=0, help="seeds data, sigma indices, z, dropout and the grids; default 0")
    a("--num-shapes", type=int, default=10000, help="size of the generated shapes set; default 10000")
    a("--log-every", type=int, default=None, help="steps between log lines / metrics.jsonl records")
    a("--grid-every", type=int, default=None, help="steps between PNG grids (1- and 2-step samples, EMA student)")
    a("--save-every", type=int, default=None, help="steps between checkpoints (ckpt.pt, written atomically)")
    a("--num-grid", type=int, default=None, help="images per grid")
    a("--tiny", action="store_true", help="tiny data, batch and step count: see the loop run on a laptop CPU")
    a("--dry-run", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the dataset's defaults (then --tiny's); explicit flags always win."""
    family = "shapes" if args.dataset == "shapes" else "cifar10"  # folder:PATH trains with the cifar10 recipe
    defaults = dict(DATASET_DEFAULTS[family], **(TINY if args.tiny else {}))
    for key, value in defaults.items():
        if key == "num_shapes":
            args.num_shapes = value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.teacher is None and args.resume is None:
        raise UserError("--teacher PATH (a dpm_at.py checkpoint) is required")
    if args.out is None:
        args.out = os.path.dirname(args.resume) if args.resume else \
            os.path.join("runs", f"{args.dataset.split(':')[0]}_cd_{'at' if args.adv_steps > 0 else 'std'}")
    for key in ("steps", "batch_size", "log_every", "grid_every", "save_every", "num_grid"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.num_scales < 2 or args.adv_steps < 0 or not 0 <= args.target_decay < 1:
        raise UserError("need --num-scales >= 2, --adv-steps >= 0 and 0 <= --target-decay < 1")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The teacher's ODE step and the consistency loss


@torch.no_grad()
def teacher_step(denoise, x_hi, sigma_hi, sigma_lo, heun: bool = True) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma from sigma_hi down to sigma_lo.

    EDM Alg. 1 / SPEC §4.2: Euler, plus Heun's trapezoidal correction (sigma_lo >= sigma_min > 0 on the CD grid).
    sigma_hi, sigma_lo: (B,); x_hi: (B, C, H, W).
    """
    s_hi, s_lo = sampler.expand(sigma_hi, x_hi), sampler.expand(sigma_lo, x_hi)  # (B, 1, 1, 1)
    d = (x_hi - denoise(x_hi, sigma_hi)) / s_hi
    x_lo = x_hi + (s_lo - s_hi) * d
    if heun:
        d_lo = (x_lo - denoise(x_lo, sigma_lo)) / s_lo
        x_lo = x_hi + (s_lo - s_hi) * (d + d_lo) / 2
    return x_lo


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # SPEC §4.2 (CM Sec. 3, "l2"): per-pixel mean of the squared difference, per sample (B,)
    return (a - b).pow(2).flatten(1).mean(1)


def pseudo_huber_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # iCT Sec. 3.3: sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d), per sample (B,)
    c = 0.00054 * a[0].numel() ** 0.5
    return ((a - b).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


# Deviation: no LPIPS (the CM paper's CIFAR-10 choice, SPEC §4.2): it needs downloaded VGG weights. We offer l2
# (the CM paper's pixel metric) and iCT's pseudo-Huber, which iCT found to close most of the gap to LPIPS.
DISTANCES = {"l2": l2_distance, "pseudo_huber": pseudo_huber_distance}


def _dropout_rng(device: torch.device):
    """The module whose get/set_rng_state drive nn.Dropout's masks on this device."""
    return torch.cuda if device.type == "cuda" else torch


def cd_loss(f, f_target, x_hi, delta, x_lo, sigma_hi, sigma_lo, distance: str = "l2") -> torch.Tensor:
    """Per-sample CD-AT loss (B,), SPEC §4.2 and §4.4 (CM Eq. 7 with uniform weight lambda = 1):

        l = d( f_theta(x_hi + delta, sigma_hi), sg f_theta-(x_lo, sigma_lo) )
    delta shifts only the student's input; the target is the clean one, as x_0 is unchanged in the DPM form.
    """
    state = _dropout_rng(x_hi.device).get_rng_state()
    online = f(x_hi + delta, sigma_hi)
    # As the CM reference code: the target pass replays the online pass's dropout masks (no-op without dropout).
    _dropout_rng(x_hi.device).set_rng_state(state)
    with torch.no_grad():  # sg: no gradient through the target net or into delta from it
        target = f_target(x_lo, sigma_lo)
    return DISTANCES[distance](online, target)


# same as in dpm_at.py: keep in sync
@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    # theta_ema <- decay * theta_ema + (1 - decay) * theta, after every optimizer step (decay 0 copies theta exactly)
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


def free_at_step(student, target, ema, opt, x_hi, x_lo, sigma_hi, sigma_lo, args, sigma_data: float = 0.5):
    """SPEC §4.4: K passes of attacks.free_at on the student's input; after every optimizer step the target net
    (rate mu) and the eval-EMA are updated. Returns (clean loss, last-pass loss, last delta), detached."""
    d = x_hi[0].numel()
    # SPEC §3.6 for CM: 'vp' maps the VP-space ball and step into EDM space by sqrt(1 + sigma^2), per sample
    scale = sampler.expand((1 + sigma_hi**2).sqrt(), x_hi) if args.adv_space == "vp" else 1.0  # (B, 1, 1, 1)
    # SPEC §3.3: radius eta*sqrt(d), step alpha; eta <= 0 means no projection (attacks.l2_step)
    radius = attacks.l2_radius(args.adv_budget, d) * scale if args.adv_budget > 0 else 0.0
    step_size = args.adv_step_size * scale
    f = sampler.consistency_fn(student, SIGMA_MIN, sigma_data)
    f_target = sampler.consistency_fn(target, SIGMA_MIN, sigma_data)

    def after_update():
        # SPEC §4.2: theta- <- mu theta- + (1 - mu) theta; then the eval-EMA, as dpm_at.py
        update_ema(target, student, args.target_decay)
        update_ema(ema, student, args.ema_decay)

    # SPEC §4.4 [PROJECT]: the closure reruns the target pass on every inner step, since theta- moved after each
    return attacks.free_at(lambda delta: cd_loss(f, f_target, x_hi, delta, x_lo, sigma_hi, sigma_lo, args.distance),
                           x_hi, opt, args.adv_steps, "l2", step_size, radius, after_update)


# ----------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel, with the global batch's randomness drawn on every rank


# same as in dpm_at.py: keep in sync
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


# same as in dpm_at.py: keep in sync
def global_rows(b: int) -> tuple[int, slice]:
    """(global batch size, this rank's rows of it) for a local batch of b; (b, all rows) in a single process."""
    if not dist.is_initialized():
        return b, slice(None)
    rank = dist.get_rank()
    return b * dist.get_world_size(), slice(rank * b, (rank + 1) * b)


# same as in dpm_at.py: keep in sync
def any_rank(flag: bool, device) -> bool:
    """True on every rank when flag is true on any rank (a Ctrl-C seen by one process stops all of them)."""
    if not dist.is_initialized():
        return flag
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_step(student, target, ema, opt, denoise, x0, sigmas, args, generator, sigma_data: float = 0.5):
    """One data batch of CD + free AT in the paper's order: sample sigma, build x_hi, teacher step, inner max and
    outer steps. Draws i, then z, from generator. Returns (clean loss, last-pass loss, last delta)."""
    # SPEC §4.2: i ~ U{0..N-2}, sigma_hi = t_i, sigma_lo = t_{i+1}; fixed for all K inner passes (SPEC §3.4 step 1)
    B, rows = global_rows(x0.shape[0])  # draw for the global batch, keep this rank's rows (dpm_at.py explains)
    i = torch.randint(0, len(sigmas) - 1, (B,), generator=generator, device=x0.device)[rows]
    sigma_hi, sigma_lo = sigmas[i], sigmas[i + 1]  # (B,) float64
    z = torch.randn((B, *x0.shape[1:]), generator=generator, device=x0.device)[rows]
    x_hi = x0 + sampler.expand(sigma_hi, x0) * z
    # The teacher step runs once, on the clean x_hi: under AT the target stays the clean one (SPEC §4.4)
    x_lo = teacher_step(denoise, x_hi, sigma_hi, sigma_lo, heun=args.solver == "heun")
    return free_at_step(student, target, ema, opt, x_hi, x_lo, sigma_hi, sigma_lo, args, sigma_data)


# ----------------------------------------------------------------------------------------------------------------
# Teacher, student and checkpoints: one torch.save of plain dicts and tensors, read back with weights_only=True


# same as in dpm_at.py: keep in sync
def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, kind: str) -> dict:
    """A checkpoint of this kind ("dpm": a dpm_at.py teacher, "cm": a cm_at.py run), else a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle content, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "adv-diffusion/1" or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} is not a {'dpm_at.py' if kind == 'dpm' else 'cm_at.py'} checkpoint"
                        + (f" (it holds a {found!r} model)" if found else ""))
    return ckpt


def gpu_layout(device: str, *nets: torch.nn.Module) -> None:
    """CUDA only: cuDNN autotuning and channels_last weights, the layout its convolutions prefer. The arithmetic stays
    fp32 (PyTorch's default TF32 convolutions): no bf16 here, as the CD loss compares two network outputs at
    neighbouring noise levels, whose difference is small [PROJECT]. Nothing changes on CPU."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True  # shapes are fixed: cuDNN times its conv algorithms once per shape
    for net in nets:
        net.to(memory_format=torch.channels_last)


def load_teacher(ckpt: dict, device: str):
    """The teacher's denoiser D_phi(x; sigma) built from its EMA weights, frozen and in eval mode (SPEC §4.2)."""
    loss = ckpt.get("loss")
    if loss not in ("edm", "ddpm"):
        raise UserError(f"the teacher's loss is {loss!r}; cm_at.py distils 'edm' or 'ddpm' diffusion models")
    try:
        net = unet.build_from_config(ckpt["net"])
        net.load_state_dict(ckpt["ema"])
        net = net.to(device).eval().requires_grad_(False)
        gpu_layout(device, net)
        if loss == "edm":
            return sampler.edm_denoiser(net, ckpt.get("sigma_data", 0.5))
        # SPEC §2.2: the VP eps-network as a denoiser; sigma picks the nearest of its 1000 steps
        return sampler.vp_denoiser(net, sampler.alpha_bar_from_beta(sampler.make_beta(ckpt["schedule"])).to(device))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"the teacher checkpoint is incomplete: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def student_from_teacher(ckpt: dict, dropout: float | None = None):
    """UNet kwargs and initial weights of the student: the teacher's EMA weights (SPEC §4.2, cifar10_ve_cd.py).

    The student outputs C channels; a learned-sigma teacher's [eps, v] output conv keeps its first C channels.
    """
    C = ckpt["net"]["in_channels"]
    net_config = dict(ckpt["net"], out_channels=C)
    if dropout is not None:
        net_config["dropout"] = dropout
    state = dict(ckpt["ema"])
    state["out_conv.weight"], state["out_conv.bias"] = state["out_conv.weight"][:C], state["out_conv.bias"][:C]
    return net_config, state


@torch.no_grad()
def save_grids(ema, sigmas, args, step: int, shape, sigma_data: float) -> None:
    """1-step and 2-step consistency samples of the EMA student from a fixed seed (CM Alg. 1, sampler.py)."""
    f = sampler.consistency_fn(ema, SIGMA_MIN, sigma_data)
    for n_steps in (1, 2):
        g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
        z = torch.randn((args.num_grid, *shape), generator=g, device=args.device)
        # the same evenly spread indices as `python sampler.py --sampler consistency --steps n`
        indices = [round(k * (len(sigmas) - 1) / n_steps) for k in range(n_steps + 1)]
        x = sampler.consistency_sample(f, z, sigmas, indices, g, SIGMA_MIN)
        data.save_image_grid(x.cpu(), os.path.join(args.out, f"grid_{step:07d}_{n_steps}step.png"))


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
    resumed = load_checkpoint(args.resume, "cm") if args.resume else None
    args.teacher = args.teacher or resumed["teacher"]
    teacher = load_checkpoint(args.teacher, "dpm")
    denoise = load_teacher(teacher, args.device)
    sigma_data = teacher.get("sigma_data", 0.5)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    torch.manual_seed(args.seed)  # dropout masks
    generator = torch.Generator(device=args.device).manual_seed(args.seed)  # data, sigma indices, z
    images = data.load_dataset(args.dataset, args.data_dir, seed=args.seed, num_shapes=args.num_shapes,
                               image_size=teacher["net"]["image_size"]).to(args.device)

    net_config, state = (resumed["net"], resumed["model"]) if resumed else student_from_teacher(teacher, args.dropout)
    student = unet.build_from_config(net_config).to(args.device)
    student.load_state_dict(state)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    # SPEC §4.2: the target net starts as the student; it runs in train mode, as the online pass (same dropout)
    target = copy.deepcopy(student).requires_grad_(False)
    gpu_layout(args.device, student, ema, target)
    # SPEC §4.2 (CIFAR-10): RAdam, constant lr
    opt = torch.optim.RAdam(student.parameters(), lr=args.lr)
    # averages the weight gradients over ranks; delta.grad stays local (per sample)
    train_student = student if world == 1 else DistributedDataParallel(
        student, device_ids=[torch.device(args.device)] if args.device.startswith("cuda") else None)
    num_scales = resumed["num_scales"] if resumed else args.num_scales
    sigmas = sampler.karras_sigmas(num_scales, SIGMA_MIN, SIGMA_MAX)[:-1].to(args.device)  # drop t_N = 0
    step = 0
    if resumed:
        ema.load_state_dict(resumed["ema"])
        target.load_state_dict(resumed["target"])
        opt.load_state_dict(resumed["opt"])
        for group in opt.param_groups:
            group["lr"] = args.lr
        step = resumed["step"]
        torch.set_rng_state(resumed["rng_cpu"])
        generator.set_state(resumed["rng_gen"])
    say(f"student UNet {unet.count_parameters(student) / 1e6:.2f}M parameters; teacher {args.teacher} "
        f"({teacher['loss']}); data {tuple(images.shape)}; N = {num_scales}; "
        f"{'AT K=' + str(args.adv_steps) if args.adv_steps else 'plain CD'}; from step {step}"
        + (f"; {world} processes x {args.batch_size // world} images" if world > 1 else ""))

    def checkpoint(path=ckpt_path):
        if rank > 0:  # every rank holds the same state; rank 0 writes it while the others wait
            return dist.barrier()
        save_checkpoint(path, dict(format="adv-diffusion/1", kind="cm", loss="cd", net=net_config,
                                   model=student.state_dict(), ema=ema.state_dict(), target=target.state_dict(),
                                   opt=opt.state_dict(), step=step, args=vars(args), num_scales=num_scales,
                                   sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=sigma_data,
                                   teacher=str(args.teacher), rng_cpu=torch.get_rng_state(),
                                   rng_gen=generator.get_state()))
        if world > 1:
            dist.barrier()

    if step == 0 and rank == 0:  # the student before distillation: the teacher's F under the consistency scalings
        save_grids(ema, sigmas, args, 0, images.shape[1:], sigma_data)
    # Ctrl-C: finish the current batch, save, exit. A second Ctrl-C stops at once.
    stop = []
    previous_handler = signal.signal(signal.SIGINT,
                                     lambda *a: signal.default_int_handler(*a) if stop else stop.append(1))
    sums, t_last, step_last = torch.zeros(3, device=args.device), time.time(), step
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, dynamic_ncols=True, disable=rank > 0)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    rows = global_rows(args.batch_size // world)[1]
    try:
        for step in bar:
            x0 = data.random_batch(images, args.batch_size, generator)[rows]
            if args.device.startswith("cuda"):  # the input in the networks' layout (gpu_layout)
                x0 = x0.contiguous(memory_format=torch.channels_last)
            student.train()
            target.train()
            clean, last, delta = train_step(train_student, target, ema, opt, denoise, x0, sigmas, args, generator,
                                            sigma_data)
            sums += torch.stack([clean, last, attacks.per_sample_norm(delta).mean()])
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
                bar.set_postfix(loss=f"{loss:.3g}", adv=f"{adv_loss:.3g}", delta=f"{delta_norm:.3f}")
                sums.zero_()
                t_last, step_last = time.time(), step
            if grid and rank == 0:
                save_grids(ema, sigmas, args, step, images.shape[1:], sigma_data)
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
