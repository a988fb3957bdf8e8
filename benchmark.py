"""Training and sampling throughput of the project's fast path: one JSON line per configuration.

Paper: Wang et al. 2025, arXiv:2502.17099v1; the cost of efficient AT (Sec. 4): K passes per data batch, each one
       forward/backward that serves both the weight update and the ascent step on delta.
Uses: dpm_at.py (train_step, fast_path), unet.py, sampler.py, data.py. Like the tests, this tool imports an entry
      script; nothing imports it.
Run: python benchmark.py              (CUDA: the cifar10 preset at batch 128 and 512, eager and --compile;
                                       CPU: the tiny preset at batch 8, so that it stays runnable on a laptop)

Timings are medians over >= 20 steps after warm-up, each bracketed by CUDA events (or a wall clock on CPU) with a
device synchronisation; FLOPs come from torch.utils.flop_counter on one forward+backward (no hand count).
"""
import argparse
import copy
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import dpm_at
import sampler
import unet


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="UNet preset; default cifar10 on CUDA, tiny on CPU")
    p.add_argument("--batch-sizes", default=None, help="comma list; default 128,512 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median); default 20")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="also time torch.compile (batch 128 only); default on for CUDA")
    p.add_argument("--sample-batch", type=int, default=None, help="batch for sampler throughput; 1000 CUDA, 16 CPU")
    return p.parse_args(argv)


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


def train_args(device: str, batch_size: int, adv_steps: int, compile_: bool) -> argparse.Namespace:
    """The cifar10 recipe's training flags (SPEC §1.7, §3.4), as dpm_at.py resolves them."""
    argv = ["--dataset", "cifar10", "--device", device, "--batch-size", str(batch_size), "--adv-steps",
            str(adv_steps)] + (["--compile"] if compile_ else [])
    return dpm_at.resolve_args(dpm_at.parse_args(argv))


def bench_train(preset: str, batch_size: int, adv_steps: int, compile_: bool, device: str, steps: int) -> dict:
    args = train_args(device, batch_size, adv_steps, compile_)
    torch.manual_seed(0)
    net = unet.build_unet(preset, learn_sigma=args.learn_sigma).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    train_net, opt, autocast = dpm_at.fast_path(net, args)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta(args.schedule)).to(device)
    T = alpha_bar.shape[0]
    t_state = dict(history=torch.zeros(T, 10, device=device), count=torch.zeros(T, dtype=torch.long, device=device))
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        x0 = dpm_at.to_input_layout(data.random_batch(images, batch_size, generator), args)
        with autocast:
            dpm_at.train_step(train_net, ema, opt, x0, alpha_bar, args, generator, t_state)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ms = statistics.median(timed(step, device, steps, warmup=5 if compile_ else 3))
    passes = max(adv_steps, 1)
    with FlopCounterMode(display=False) as counter:  # one training pass: forward + backward of the network
        x = torch.randn(batch_size, 3, 32, 32, device=device)
        net(x, torch.zeros(batch_size, device=device)).float().square().mean().backward()
    flops = counter.get_total_flops()
    return dict(kind="train", preset=preset, batch=batch_size, adv_steps=adv_steps, compiled=compile_,
                precision=args.precision, ms_per_batch=round(ms, 2), ms_per_update=round(ms / passes, 2),
                img_per_s=round(batch_size / ms * 1000, 1),
                peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda") else None,
                gflop_per_img_pass=round(flops / batch_size / 1e9, 2),
                tflop_per_s=round(flops * passes / (ms / 1000) / 1e12, 3))


def bench_sampler(preset: str, name: str, steps: int, batch_size: int, device: str) -> dict:
    torch.manual_seed(0)
    net = unet.build_unet(preset, learn_sigma=True).to(device).eval().requires_grad_(False)
    for p in net.parameters():  # fresh ADM nets output zeros; give them real work
        p.add_(0.01 * torch.randn_like(p))
    if device.startswith("cuda"):
        net.to(memory_format=torch.channels_last)
    ckpt = dict(kind="dpm", loss="ddpm", schedule="cosine", net=dict(in_channels=3, out_channels=6))
    args = sampler.parse_args(["--ckpt", "-"])
    z = torch.randn(batch_size, 3, 32, 32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def run():
        with autocast:
            sampler.generate(ckpt, net, name, steps, z, g, args)

    ms = statistics.median(timed(run, device, 3, warmup=1))
    img_per_s = batch_size / ms * 1000
    return dict(kind="sample", sampler=name, steps=steps, nfe=sampler.nfe(name, steps), batch=batch_size,
                img_per_s=round(img_per_s, 1), minutes_for_50k=round(50_000 / img_per_s / 60, 2))


def main(args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    preset = args.preset or ("cifar10" if cuda else "tiny")
    batches = [int(b) for b in (args.batch_sizes or ("128,512" if cuda else "8")).split(",")]
    compile_ = cuda if args.compile is None else args.compile
    configs = [(b, k, False) for b in batches for k in (0, 3)]
    configs += [(batches[0], k, True) for k in (0, 3)] if compile_ else []
    if cuda:
        print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__)), flush=True)
    sample_batch = args.sample_batch or (1000 if cuda else 16)
    eager, compiled = [c for c in configs if not c[2]], [c for c in configs if c[2]]
    for b, k, c in eager:
        report_train(preset, b, k, c, args)
    for name, steps in (("ddim", 10), ("heun", 18)):
        print(json.dumps(bench_sampler(preset, name, steps, sample_batch, args.device)), flush=True)
    for b, k, c in compiled:  # last: the one-time compilation is slow
        report_train(preset, b, k, c, args)


def report_train(preset, b, k, c, args):
    try:
        print(json.dumps(bench_train(preset, b, k, c, args.device, args.steps)), flush=True)
    except Exception as e:  # one failing configuration (out of memory, compiler) must not hide the others
        print(json.dumps(dict(kind="train", batch=b, adv_steps=k, compiled=c, error=repr(e)[:300])), flush=True)

if __name__ == "__main__":
    main(parse_args())
