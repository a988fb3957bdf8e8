"""Train a diffusion model (DPM) with efficient ("free") adversarial training on the noisy input x_t.

Paper: Wang et al. 2025, arXiv:2502.17099v1; DRO over a ball around q(x_t) <=> AT on x_t (Sec. 3-4, the AT objective
       Eq. (14)); efficient AT (Sec. 4): K ascent steps on delta, each reusing the backward pass of a weight update.
Borrowed: DDPM (Ho et al. 2020) Alg. 1 and L_simple (Eq. 14 of DDPM); ADM / IDDPM CIFAR-10 recipe (Nichol & Dhariwal
          2021); "free" AT minibatch replay (Shafahi et al. 2019, Alg. 1). Loop semantics follow the authors' released
          code, see ../shared/SPEC.md §3.4.
Uses: unet.py, data.py, sampler.py, attacks.py.     Used by: nothing (writes checkpoints that cm_at.py and
      sampler.py read: the checkpoint dict, not this code, is the contract).

    python dpm_at.py --dataset shapes                      # offline demo on a laptop CPU (~10 min, grids in runs/)
    python dpm_at.py --dataset shapes --tiny --steps 20    # seconds: watch the loop run
    python dpm_at.py --dataset cifar10 --adv-steps 0 --steps 250000 --out runs/c10_clean   # clean pre-training
    python dpm_at.py --dataset cifar10 --init-from runs/c10_clean/ckpt.pt --out runs/c10_at # AT fine-tuning (paper)

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
from tqdm import tqdm

import attacks
import data
import sampler
import unet

# Per-dataset defaults; explicit flags win. cifar10 = the authors' cifar_adv_train.sh (SPEC §1.7, §3.4): batch 128,
# AdamW lr 1e-4, EMA 0.9999, 200K AT steps after 250K clean ones. shapes / tiny are ours [PROJECT]: small enough for
# a CPU, with a short EMA so that grids show progress within minutes.
DATASET_DEFAULTS = {
    "cifar10": dict(preset="cifar10", steps=200_000, batch_size=128, lr=1e-4, ema_decay=0.9999,
                    log_every=100, grid_every=5000, save_every=5000, num_grid=64),
    "shapes": dict(preset="small", steps=3000, batch_size=32, lr=2e-4, ema_decay=0.995,
                   log_every=50, grid_every=500, save_every=500, num_grid=64),
}
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
    a("--batch-size", type=int, default=None, help="images per batch; cifar10: 128 (SPEC §1.7)")
    a("--lr", type=float, default=None, help="AdamW learning rate, constant; cifar10: 1e-4 (SPEC §1.7)")
    a("--ema-decay", type=float, default=None, help="EMA decay per optimizer step; cifar10: 0.9999 (SPEC §1.7)")
    a("--preset", default=None, help="UNet size: cifar10 | small | tiny (unet.PRESETS)")
    a("--dropout", type=float, default=None, help="dropout; default the preset's (cifar10: 0.3, SPEC §1.7)")
    a("--schedule", default="cosine", help="VP beta schedule: cosine | linear (SPEC §1.1); default cosine")
    a("--adv-steps", type=int, default=3, help="K inner passes per batch, each an optimizer step (SPEC §3.4); "
                                                "0 = standard training; default 3")
    a("--adv-step-size", type=float, default=0.1, help="ascent step alpha (SPEC §3.3 adv_lr); default 0.1")
    a("--adv-budget", type=float, default=0.1, help="eta: l2 radius eta*sqrt(d), or the l-inf bound (SPEC §3.3 "
                                                    "adv_max_norm); default 0.1")
    a("--adv-norm", default="l2", choices=["l2", "linf"], help="perturbation ball; default l2 (the released code)")
    a("--adv-step-scale", default="abs", choices=["abs", "sqrt_d"],
      help="l2 step length alpha (abs, released code) or alpha*sqrt(d); default abs")
    a("--adv-target", default="delta_detach", choices=list(TARGETS),
      help="regression target under perturbation (SPEC §3.2); default delta_detach (authors' CIFAR-10 script)")
    a("--init-from", default=None, help="start from this checkpoint's weights (+EMA), fresh optimizer, step 0")
    a("--resume", default=None, help="continue a run from its checkpoint (weights, EMA, optimizer, step, RNG)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default cuda if available")
    a("--seed", type=int, default=0, help="seeds init, data, t, eps, dropout and the grids; default 0")
    a("--num-shapes", type=int, default=10000, help="size of the generated shapes set; default 10000")
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
    family = "shapes" if args.dataset == "shapes" else "cifar10"  # folder:PATH trains with the cifar10 recipe
    defaults = dict(DATASET_DEFAULTS[family], **(TINY if args.tiny else {}))
    for key, value in defaults.items():
        if key == "num_shapes":
            args.num_shapes = value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.dirname(args.resume) if args.resume else \
            os.path.join("runs", f"{args.dataset.split(':')[0]}_{'at' if args.adv_steps > 0 else 'std'}")
    for key in ("steps", "batch_size", "log_every", "grid_every", "save_every", "num_grid", "grid_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.adv_steps < 0:
        raise UserError(f"--adv-steps must be >= 0, got {args.adv_steps}")
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


def ddpm_loss(net, x_t, t, eps, delta, alpha_bar, target: str = "delta_detach") -> torch.Tensor:
    """Per-sample AT loss (B,) at x_t + delta. SPEC §3.1 (the paper's Eq. (14) as we read it):

        l = mean || eps + delta / sqrt(1 - alpha_bar_t) - eps_theta(x_t + delta, t) ||^2
    With delta = 0 this is DDPM's L_simple (Ho et al. 2020, Eq. 14).
    """
    s = sampler.expand((1 - alpha_bar.to(x_t.device)[t]).sqrt(), x_t)  # (B, 1, 1, 1)
    eps_hat = net(x_t + delta, t.to(x_t.dtype))
    return (TARGETS[target](eps, delta, s) - eps_hat).pow(2).flatten(1).mean(1)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    # SPEC §1.7: theta_ema <- decay * theta_ema + (1 - decay) * theta, after every optimizer step
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


def free_at_step(net, ema, opt, loss_of_delta, x_noisy, args, d: int):
    """SPEC §3.4 step 2: K passes on one batch; each pass = one backward giving BOTH gradients.

    loss_of_delta(delta) -> per-sample loss (B,) with everything else (x_0, t, eps) fixed for all K passes.
    Returns (clean loss of pass 0, loss of the last pass, mean ||delta|| of the last pass), as tensors (no sync).
    """
    if args.adv_norm == "l2":
        radius = attacks.l2_radius(args.adv_budget, d)
        step_size = attacks.step_length(args.adv_step_size, d, args.adv_step_scale)
    else:
        radius, step_size = args.adv_budget, args.adv_step_size
    n_pass = max(args.adv_steps, 1)  # K = 0 is standard training: one pass with delta = 0
    delta = torch.zeros_like(x_noisy)  # SPEC §3.4: delta starts at 0 on every batch
    for k in range(n_pass):
        ascend = k < n_pass - 1  # the last delta is used once and never updated
        delta.requires_grad_(ascend)
        opt.zero_grad(set_to_none=True)
        loss = loss_of_delta(delta).mean()
        # The "free" reuse: this one backward fills p.grad for the weight update AND delta.grad for the ascent;
        # both are gradients at the current theta, as in the released code.
        loss.backward()
        if k == 0:
            clean_loss = loss.detach()
        if ascend:
            delta = attacks.STEPS[args.adv_norm](delta.detach(), delta.grad, step_size, radius)
        opt.step()
        update_ema(ema, net, args.ema_decay)
    return clean_loss, loss.detach(), attacks.per_sample_norm(delta.detach()).mean()


def train_step(net, ema, opt, x0, alpha_bar, args, generator):
    """One data batch of DDPM + free AT, in the paper's order: sample t, build x_t, inner max, outer steps."""
    T = alpha_bar.shape[0]
    # SPEC §3.4 step 1: t, eps (and x_0) are drawn once and stay fixed for all K inner passes
    t = torch.randint(0, T, (x0.shape[0],), generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = sampler.q_sample(x0, t, eps, alpha_bar)
    d = x0[0].numel()
    return free_at_step(net, ema, opt, lambda delta: ddpm_loss(net, x_t, t, eps, delta, alpha_bar, args.adv_target),
                        x_t, args, d)


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
    """EMA samples from a fixed seed (so grids of one run are comparable), DDIM on respaced steps (sampler.py)."""
    g = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    x_T = torch.randn((args.num_grid, *shape), generator=g, device=args.device)
    x = sampler.ddim_sample(sampler.vp_denoiser(ema, alpha_bar), x_T, alpha_bar, sampler.respace(str(args.grid_steps)))
    data.save_image_grid(x.cpu(), path)


def main(args: argparse.Namespace) -> None:
    args = resolve_args(args)
    print(json.dumps(vars(args), indent=1))
    if args.dry_run:
        return
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume is None and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: pass --resume {ckpt_path} to continue it, or choose another --out")
    resumed = load_checkpoint(args.resume) if args.resume else None
    init = load_checkpoint(args.init_from) if args.init_from else None
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)

    # On x86 CPUs, denormal floats (underflow in exp/sigmoid inside SiLU, softmax, GroupNorm backward) made training
    # steps 10-25x slower in our measurements; flushing them to zero changes only values below 1.2e-38.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)  # init weights and dropout masks
    generator = torch.Generator(device=args.device).manual_seed(args.seed)  # data, t, eps
    images = data.load_dataset(args.dataset, args.data_dir, seed=args.seed, num_shapes=args.num_shapes)
    images = images.to(args.device)  # uint8; CIFAR-10 is 150 MB, so it can sit on the GPU

    source = resumed or init
    net_config = source["net"] if source else dict(unet.PRESETS[args.preset], in_channels=3, out_channels=3,
                                                   image_size=images.shape[-1])
    if args.dropout is not None:
        net_config["dropout"] = args.dropout
    schedule = source["schedule"] if source else args.schedule
    net = unet.UNet(**net_config).to(args.device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # SPEC §1.7: AdamW, weight decay 0, constant lr
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta(schedule)).to(args.device)
    step = 0
    if source:
        net.load_state_dict(source["model"])
        ema.load_state_dict(source["ema"] if "ema" in source else source["model"])
    if resumed:
        opt.load_state_dict(resumed["opt"])
        for group in opt.param_groups:
            group["lr"] = args.lr
        step = resumed["step"]
        torch.set_rng_state(resumed["rng_cpu"])
        generator.set_state(resumed["rng_gen"])
    print(f"UNet {unet.count_parameters(net) / 1e6:.2f}M parameters; data {tuple(images.shape)}; "
          f"{'AT K=' + str(args.adv_steps) if args.adv_steps else 'standard training'}; from step {step}")

    def checkpoint(path=ckpt_path):
        save_checkpoint(path, dict(format="adv-diffusion/1", kind="dpm", loss="ddpm", net=net_config,
                                   schedule=schedule, model=net.state_dict(), ema=ema.state_dict(),
                                   opt=opt.state_dict(), step=step, args=vars(args), rng_cpu=torch.get_rng_state(),
                                   rng_gen=generator.get_state()))

    # Ctrl-C: finish the current batch, save, exit. A second Ctrl-C stops at once.
    stop = []
    previous_handler = signal.signal(signal.SIGINT, lambda *a: signal.default_int_handler(*a) if stop else stop.append(1))
    sums, t_last, step_last = torch.zeros(3, device=args.device), time.time(), step
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, dynamic_ncols=True)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a")
    try:
        for step in bar:
            x0 = data.random_batch(images, args.batch_size, generator)
            net.train()
            sums += torch.stack(train_step(net, ema, opt, x0, alpha_bar, args, generator))
            step += 1  # counts finished batches (SPEC §3.4: K optimizer steps per batch, one step count)
            log, save, grid = (step % n == 0 or step == args.steps
                               for n in (args.log_every, args.save_every, args.grid_every))
            if (log or save or grid or stop) and not torch.isfinite(sums).all():  # one host sync per interval
                raise UserError(f"loss is not finite by step {step}; stopped. Last good checkpoint: {ckpt_path}")
            if log:
                n, dt = step - step_last, time.time() - t_last
                loss, adv_loss, delta_norm = (sums / n).tolist()
                rec = dict(step=step, loss=loss, adv_loss=adv_loss, delta_norm=delta_norm, lr=args.lr,
                           img_per_s=n * args.batch_size / dt, sec_per_step=dt / n)
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss:.4f}", adv=f"{adv_loss:.4f}", delta=f"{delta_norm:.3f}")
                sums.zero_()
                t_last, step_last = time.time(), step
            if grid:
                save_grid(ema, alpha_bar, args, os.path.join(args.out, f"grid_{step:07d}.png"), images.shape[1:])
            if save or stop:
                checkpoint()
            if stop:
                print(f"\ninterrupted: saved {ckpt_path} at step {step}; continue with --resume {ckpt_path}")
                sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        metrics.close()
        bar.close()
    print(f"done: {ckpt_path} (step {step})")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (UserError, data.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
