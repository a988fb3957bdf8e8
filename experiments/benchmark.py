"""Training and sampling throughput of the project's fast path: one JSON line per configuration.

Paper: Wang et al. 2025, arXiv:2502.17099v1; the cost of efficient AT (Sec. 4): K passes per data batch, each one
       forward/backward that serves both the weight update and the ascent step on delta.
Uses: dpm_at.py (make_losses, train_step, fast_path), unet.py, sampler.py (fast_sampling, generate), data.py.
      Used by: nothing.
Run: python experiments/benchmark.py           (CUDA: the cifar10 preset at batch 128 and 512, eager and compiled;
                                                CPU: the tiny preset at batch 8, so that it stays runnable on a laptop)
     python experiments/benchmark.py --profile prof.txt   (also: a torch.profiler table of the step's top kernels)
     python experiments/benchmark.py --kinds train --batch-sizes 128 --compile-modes reduce-overhead   (a short A/B)

Kinds of line:
  train   one training step of dpm_at.py as `python dpm_at.py --dataset cifar10` runs it (hybrid loss, learned
          sigma, loss-second-moment t, on-device uint8 data with flips, optimizer, EMA), plain (K = 0) or AT (K = 3)
  net     the network's forward + backward alone on an MSE loss, no optimizer: what the rest of the step adds is
          the difference to the plain train line
  sample  sampler.py's generate() through sampler.fast_sampling, as `python sampler.py` runs it (one generator per
          image, the command line's default precision)
Timings are medians over >= 20 steps (3 sampler runs) after warm-up, each bracketed by a device synchronisation.
Peak memory is read right after the timed steps (torch.cuda.max_memory_allocated, reset before the warm-up).
FLOPs come from torch.utils.flop_counter on one forward+backward of 2 images, times batch/2 (no hand count).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: the components
import data  # noqa: E402
import dpm_at  # noqa: E402
import sampler  # noqa: E402
import unet  # noqa: E402

IMAGE = (3, 32, 32)  # CIFAR-10's shape; every preset here is built for it
KINDS = ("train", "sample", "net")  # the kinds of timed line (see the docstring)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="UNet preset; default cifar10 on CUDA, tiny on CPU")
    p.add_argument("--batch-sizes", default=None, help="comma list; default 128,512 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median); default 20")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="also time torch.compile (first batch size only); default on for CUDA")
    p.add_argument("--compile-modes", default="reduce-overhead,default",
                   help="comma list of dpm_at.py --compile-mode values to time; default reduce-overhead,default "
                        "(the first is what dpm_at.py --compile uses on one GPU)")
    p.add_argument("--sample-batch", type=int, default=None, help="batch for sampler throughput; 1000 CUDA, 16 CPU")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="write a torch.profiler table (top 40 ops by device time, over min(--steps, 5) steps) of "
                        "the first batch size's plain step, compiled (mode default: CUDA graphs would hide the "
                        "kernels) if --compile, to FILE")
    p.add_argument("--kinds", default="train,sample,net",
                   help="comma list of the kinds of line to time (train, sample, net); default all. --kinds train "
                        "with --batch-sizes 128 is the short run for an A/B")
    args = p.parse_args(argv)
    bad = [m for m in args.compile_modes.split(",") if m and m not in dpm_at.COMPILE_MODES]
    if bad:
        p.error(f"--compile-modes: unknown mode(s) {', '.join(bad)}; "
                f"choose from {', '.join(dpm_at.COMPILE_MODES)}")
    bad = [k for k in args.kinds.split(",") if k not in KINDS]
    if bad:
        p.error(f"--kinds: unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, steps: int, warmup: int) -> list[float]:
    """Milliseconds per call, each call synchronised, after warm-up calls (which include any compilation)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return times


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str):
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda") else None


def flops_per_image_pass(net, device: str) -> float:
    """FLOPs of one forward + backward per image, counted on 2 images (every layer's cost is linear in the batch)."""
    with FlopCounterMode(display=False) as counter:
        x = torch.randn(2, *IMAGE, device=device)
        net(x, torch.zeros(2, device=device)).float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def train_args(device: str, batch_size: int) -> argparse.Namespace:
    """The cifar10 recipe's training flags (the authors' cifar_adv_train.sh), as dpm_at.py resolves them."""
    return dpm_at.resolve_args(dpm_at.parse_args(["--dataset", "cifar10", "--device", device, "--batch-size",
                                                  str(batch_size)]))


def autocast_for(args: argparse.Namespace):
    # as dpm_at.main: bf16 autocast around the K passes (the default on CUDA), weights and delta stay fp32
    return torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.precision == "bf16")


def make_train_step(preset: str, batch_size: int, adv_steps: int, compile_mode: str | None, device: str):
    """(step function, network, resolved args) for one dpm_at.py training step of the cifar10 recipe, set up as
    dpm_at.main sets it up."""
    args = train_args(device, batch_size)
    torch.manual_seed(0)
    net = unet.build_unet(preset, learn_sigma=args.learn_sigma).to(device)
    train_net, opt = dpm_at.fast_path(net, device, args.lr, compile_mode)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta(args.schedule)).to(device)
    t_state = dpm_at.make_t_state(len(alpha_bar), device)  # the recipe's loss-second-moment t-sampler
    generator = torch.Generator(device=device).manual_seed(0)
    noise_fn, loss_fn = dpm_at.make_losses(args.loss, alpha_bar, generator, t_state=t_state,
                                           adv_target=args.adv_target)
    at = dict(adv_steps=adv_steps, adv_step_size=args.adv_step_size, adv_budget=args.adv_budget,
              adv_norm=args.adv_norm, adv_step_scale=args.adv_step_scale, ema_decay=args.ema_decay, t_state=t_state)
    images = torch.randint(0, 256, (4096, *IMAGE), dtype=torch.uint8, device=device)
    autocast = autocast_for(args)

    def step():
        x0 = data.random_batch(images, batch_size, generator)
        x0 = x0.contiguous(memory_format=torch.channels_last) if device.startswith("cuda") else x0
        with autocast:
            dpm_at.train_step(train_net.train(), ema, opt, x0, noise_fn, loss_fn, **at)

    return step, net, args


def bench_train(preset: str, batch_size: int, adv_steps: int, compile_mode: str | None, device: str,
                steps: int) -> dict:
    reset_peak(device)
    step, net, args = make_train_step(preset, batch_size, adv_steps, compile_mode, device)
    ms = statistics.median(timed(step, device, steps, warmup=5 if compile_mode else 3))
    peak = peak_gb(device)  # before anything else allocates
    passes = max(adv_steps, 1)
    flops = flops_per_image_pass(net, device) * batch_size
    return dict(kind="train", preset=preset, batch=batch_size, adv_steps=adv_steps, compiled=compile_mode or False,
                precision=args.precision, ms_per_batch=round(ms, 2), ms_per_update=round(ms / passes, 2),
                img_per_s=round(batch_size / ms * 1000, 1), peak_mem_gb=peak,
                gflop_per_img_pass=round(flops / batch_size / 1e9, 2),
                tflop_per_s=round(flops * passes / (ms / 1000) / 1e12, 3))


def bench_net(preset: str, batch_size: int, compile_mode: str | None, device: str, steps: int) -> dict:
    """Forward + backward of the network alone (MSE on the eps channels), with dpm_at.py's fast-path settings."""
    reset_peak(device)
    args = train_args(device, batch_size)
    torch.manual_seed(0)
    net = unet.build_unet(preset, learn_sigma=args.learn_sigma).to(device)
    train_net, _ = dpm_at.fast_path(net, device, args.lr, compile_mode)
    x = torch.randn(batch_size, *IMAGE, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if device.startswith("cuda") else x
    t = torch.randint(0, 1000, (batch_size,), device=device).float()
    autocast = autocast_for(args)

    def step():
        net.zero_grad(set_to_none=True)
        with autocast:
            out = train_net(x, t)
        (out[:, :3].float() - x).square().mean().backward()

    ms = statistics.median(timed(step, device, steps, warmup=5 if compile_mode else 3))
    peak = peak_gb(device)
    flops = flops_per_image_pass(net, device) * batch_size
    return dict(kind="net", preset=preset, batch=batch_size, compiled=compile_mode or False,
                precision=args.precision, ms_per_pass=round(ms, 2), img_per_s=round(batch_size / ms * 1000, 1),
                peak_mem_gb=peak, tflop_per_s=round(flops / (ms / 1000) / 1e12, 3))


def sampling_net(preset: str, device: str, compile_: bool):
    """A cifar10-shaped learned-sigma network through sampler.fast_sampling, as sampler.py's main prepares it;
    returns (network, precision): the command line's default precision."""
    torch.manual_seed(0)
    net = unet.build_unet(preset, learn_sigma=True).to(device).eval().requires_grad_(False)
    for p in net.parameters():  # fresh ADM nets output zeros; give them real work
        p.add_(0.01 * torch.randn_like(p))
    precision = sampler.parse_args(["--ckpt", "-"]).precision
    return sampler.fast_sampling(net, device, precision, compile_), precision


def bench_sampler(net, precision: str, compiled: bool, name: str, steps: int, batch_size: int, device: str) -> dict:
    ckpt = dict(kind="dpm", loss="ddpm", schedule="cosine", net=dict(in_channels=3, out_channels=6))
    # as sampler.py's main: one generator per image (seeds 0..B-1), for its initial noise and every later noise
    gens = [torch.Generator(device=device).manual_seed(s) for s in range(batch_size)]
    z = sampler.randn((batch_size, *IMAGE), gens, device)
    ms = statistics.median(timed(lambda: sampler.generate(ckpt, net, name, steps, z, gens), device, 3, warmup=1))
    img_per_s = batch_size / ms * 1000
    return dict(kind="sample", sampler=name, steps=steps, nfe=sampler.nfe(name, steps), batch=batch_size,
                compiled=compiled, precision=precision, img_per_s=round(img_per_s, 1),
                minutes_for_50k=round(50_000 / img_per_s / 60, 2))


def profile(preset: str, batch_size: int, compile_mode: str | None, device: str, path: str, steps: int = 5) -> None:
    """torch.profiler over `steps` steps after warm-up; the table of the top ops by device (or CPU) time goes to
    path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, _, _ = make_train_step(preset, batch_size, 0, compile_mode, device)
    timed(step, device, 0, warmup=5 if compile_mode else 3)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40)
    with open(path, "w") as f:
        f.write(f"# plain training step, preset {preset}, batch {batch_size}, compile {compile_mode}, {steps} steps\n")
        f.write(table)
    print(json.dumps(dict(kind="profile", batch=batch_size, compiled=compile_mode or False, file=path)), flush=True)


def main(args: argparse.Namespace) -> None:
    """The lines that the fast path's targets are read from come first (compiled batch-128 training, compiled
    sampling), so that a run cut short by a time limit still has them; the eager baselines follow."""
    cuda = args.device.startswith("cuda")
    preset = args.preset or ("cifar10" if cuda else "tiny")
    batches = [int(b) for b in (args.batch_sizes or ("128,512" if cuda else "8")).split(",")]
    compile_ = cuda if args.compile is None else args.compile
    modes = [m for m in args.compile_modes.split(",") if m] if compile_ else []
    if cuda:
        print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__)), flush=True)
    sample_batch = args.sample_batch or (1000 if cuda else 16)
    kinds = args.kinds.split(",")
    for mode in modes if "train" in kinds else []:
        for k in (0, 3):
            report(bench_train, preset, batches[0], k, mode, args.device, args.steps)
    for c in (([True] if compile_ else []) + [False]) if "sample" in kinds else []:
        try:
            net, precision = sampling_net(preset, args.device, c)
        except Exception as e:  # reported like a failing configuration
            print(json.dumps(dict(kind="sample", compiled=c, error=repr(e)[:300])), flush=True)
            continue
        for name, steps in (("heun", 18), ("ddim", 10)):
            report(bench_sampler, net, precision, c, name, steps, sample_batch, args.device)
        del net
    for mode in modes if "net" in kinds else []:
        report(bench_net, preset, batches[0], mode, args.device, args.steps)
    for b in batches if "train" in kinds else []:
        for k in (0, 3):
            report(bench_train, preset, b, k, None, args.device, args.steps)
    if "net" in kinds:
        report(bench_net, preset, batches[0], None, args.device, args.steps)
    if args.profile:
        report(profile, preset, batches[0], "default" if modes else None, args.device, args.profile,
               min(args.steps, 5))


def report(fn, *a):
    """Print fn's JSON line; one failing configuration (out of memory, compiler) must not hide the others."""
    try:
        line = fn(*a)
    except Exception as e:
        line = dict(kind=fn.__name__, config=[str(x) for x in a if not isinstance(x, torch.nn.Module)][:6],
                    error=repr(e)[:300])
    if line is not None:
        print(json.dumps(line), flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(parse_args())
