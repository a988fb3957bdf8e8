"""Is the AT denoiser more robust to perturbations of its input? Standard vs AT checkpoints on `shapes`.

Paper: Wang et al. 2025, arXiv:2502.17099v1; claim (2) of the abstract: AT on x_t (Sec. 4; docs/method.md §4) makes
       the denoiser robust to perturbations of x_t. The paper's robustness protocol was not available to us; we use
       our own (docs/method.md §6).
Borrowed: l2-PGD (Madry et al. 2018) from attacks.py; VP <-> EDM scaling of a perturbation (docs/method.md §3.3).
Uses: attacks.py, data.py, sampler.py, dpm_at.py (main, for --train), figures.py.     Used by: nothing.

    python experiments/robustness.py --train   # trains standard / AT / AT-sqrt_d tiny UNets, then evaluates (~1 hour)
    python experiments/robustness.py --std runs/shapes_std/ckpt.pt --at runs/shapes_at/ckpt.pt   # your checkpoints
    python experiments/robustness.py --train --quick --out /tmp/rob --run-dir /tmp/rob/runs   # a minute: the pipeline

What is measured (docs/method.md §6; budgets are VP-space l2 radii r = gamma*sqrt(d), mapped to EDM space by
sqrt(1 + sigma^2)):
1. Denoiser error: per-pixel MSE of x0_hat = D(x_e + delta; sigma) against the true x0 on held-out images, at VP steps
   t, with delta = 0, a random direction on the sphere of radius r, or l2-PGD (5 steps of 2.5r/5, random start on
   the sphere) maximising ||D(x_e + delta) - D(x_e)||^2.
2. Sampler stability: every network call of DDIM / DDPM ancestral (NFE 10) sees its state plus such a delta (random or
   PGD); we report the per-pixel RMS change of the final samples against the clean run with the same seeds and noise.
   Deviation from "perturb the state": only the network's input is perturbed; the sampler's own update keeps the
   clean state, so the number isolates the denoiser's sensitivity (a perturbed state would also move the update).
With --train the three checkpoints make the same number of optimizer steps: AT with K passes per batch gets 1/K of
the batches (docs/method.md §4.4). "AT" uses the released defaults (alpha = 0.1 absolute, so ||delta|| <= 0.2, far
inside r = 5.54, docs/method.md §4.3); "AT sqrt_d" scales the step by sqrt(d) so that the ball is reached.

Symbols: budget gamma (RMS per pixel) -> gamma, radius -> radius, perturbation -> delta, EDM state -> x_e.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: the components
import attacks  # noqa: E402
import data  # noqa: E402
import dpm_at  # noqa: E402
import figures  # noqa: E402
import sampler  # noqa: E402

OUT = os.path.join("experiments", "results", "robustness")  # relative to the working directory: the repo root


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: train them with dpm_at.py (same seed, same optimizer steps), or take the user's


def train_runs(cfg) -> dict:
    """name -> checkpoint path; trains each run with dpm_at.main unless a finished checkpoint of it is there."""
    K, n = cfg.adv_steps, cfg.at_batches
    runs = {"standard": ["--adv-steps", "0", "--steps", str(K * n)],
            "AT": ["--adv-steps", str(K), "--steps", str(n)],
            "AT sqrt_d": ["--adv-steps", str(K), "--steps", str(n), "--adv-step-scale", "sqrt_d"]}
    paths = {}
    for name, flags in runs.items():
        out = os.path.join(cfg.run_dir, name.replace(" ", "_"))
        steps = int(flags[flags.index("--steps") + 1])
        # the settings of the recorded results: AT from the first batch, lr 1e-3 and EMA 0.99 (dpm_at.py's shapes
        # defaults have since moved to a faster first run)
        argv = ["--dataset", "shapes", "--out", out, "--seed", str(cfg.seed), "--device", "cpu", "--at-start", "0",
                "--lr", "1e-3", "--ema-decay", "0.99", "--threads", str(cfg.threads), "--log-every",
                str(max(steps // 10, 1)), "--save-every", str(steps), "--grid-every", str(steps), "--num-grid", "16",
                *(["--tiny"] if cfg.quick else []), *flags]
        path = os.path.join(out, "ckpt.pt")
        if os.path.exists(path):
            done = torch.load(path, map_location="cpu", weights_only=True)
            expected = vars(dpm_at.resolve_args(dpm_at.parse_args(argv)))
            same = ("adv_steps", "adv_step_scale", "seed", "batch_size", "lr")
            if done["step"] == steps and all(done["args"][k] == expected[k] for k in same):
                print(f"{name}: reusing {path}")
                paths[name] = path
                continue
            raise dpm_at.UserError(f"{path} exists but is not this run's finished checkpoint; delete it")
        print(f"{name}: python dpm_at.py {' '.join(argv)}", flush=True)
        dpm_at.main(dpm_at.parse_args(argv))
        paths[name] = path
    return paths


def make_denoiser(ckpt, net, alpha_bar):
    """D(x_e; sigma) for either loss (sampler.py's parameterisations)."""
    return sampler.edm_denoiser(net) if ckpt["loss"] == "edm" else sampler.vp_denoiser(net, alpha_bar)


def attack(denoise, x_e, sigma, gamma: float, kind: str, cfg, generator):
    """delta of VP-space radius gamma*sqrt(d), in EDM space (times sqrt(1 + sigma^2), docs/method.md §3.3 / §6)."""
    d = x_e[0].numel()
    radius = sampler.expand(gamma * math.sqrt(d) * (1 + sigma**2).sqrt(), x_e)  # (B, 1, 1, 1)
    if kind == "random":
        return attacks.random_perturbation(x_e, radius, generator)
    clean = denoise(x_e, sigma).detach()
    # docs/method.md §6: maximise J(delta) = ||x0_hat(x + delta) - x0_hat(x)||^2 with l2-PGD.
    # Deviation: not from delta = 0, where J is at its minimum and its gradient vanishes (PGD would never move); we
    # start at a random point of the sphere, as Madry et al. 2018 do.
    return attacks.pgd(lambda z: (denoise(z, sigma) - clean).pow(2).flatten(1).sum(1), x_e, radius, cfg.pgd_steps,
                       generator=generator, random_start=True)


# ----------------------------------------------------------------------------------------------------------------
# The two measurements


@torch.no_grad()
def denoiser_errors(denoise, x0, alpha_bar, cfg) -> dict:
    """'t/kind/gamma' -> per-pixel MSE of D(x_e + delta; sigma_t) against x0 (mean over images)."""
    generator = torch.Generator().manual_seed(cfg.seed)  # the same eps and random directions for every model
    out = {}
    for t in cfg.t:
        sigma = torch.full((x0.shape[0],), sampler.vp_sigma(alpha_bar[t]).item(), dtype=torch.float64)
        # docs/method.md §3.3: x_e = x0 + sigma eps, the EDM-space twin of x_t
        x_e = x0 + sampler.expand(sigma, x0) * torch.randn(x0.shape, generator=generator)
        out[f"{t}/none/0"] = (denoise(x_e, sigma) - x0).pow(2).mean().item()
        for gamma in cfg.gamma:
            for kind in ("random", "pgd"):
                delta = attack(denoise, x_e, sigma, gamma, kind, cfg, generator)
                out[f"{t}/{kind}/{gamma}"] = (denoise(x_e + delta, sigma) - x0).pow(2).mean().item()
    return out


def perturbed(denoise, gamma: float, kind: str, cfg, generator):
    """The denoiser as seen by a sampler whose every network call gets a perturbed input (docs/method.md §6, (2))."""

    def D(x_e, sigma):
        return denoise(x_e + attack(denoise, x_e, sigma, gamma, kind, cfg, generator), sigma)

    return D


def run_sampler(name: str, denoise, z, alpha_bar, cfg) -> torch.Tensor:
    if name == "ddim":
        return sampler.ddim_sample(denoise, z, alpha_bar, sampler.respace(f"ddim{cfg.nfe}"))
    return sampler.ddpm_sample(denoise, z, alpha_bar, sampler.respace(str(cfg.nfe)),
                               torch.Generator().manual_seed(cfg.seed + 1))  # the same sampler noise every run


def sampler_changes(denoise, shape, alpha_bar, cfg) -> tuple[dict, dict]:
    """'sampler/kind/gamma' -> mean per-pixel RMS of (perturbed - clean) final samples; and the DDIM images."""
    z = torch.randn((cfg.n_samples, *shape), generator=torch.Generator().manual_seed(cfg.seed + 2))
    out, images = {}, {}
    for name in ("ddim", "ddpm"):
        clean = run_sampler(name, denoise, z, alpha_bar, cfg)
        images[f"{name}/clean"] = clean
        for gamma in cfg.sampler_gamma:
            for kind in ("random", "pgd"):
                g = torch.Generator().manual_seed(cfg.seed + 3)
                x = run_sampler(name, perturbed(denoise, gamma, kind, cfg, g), z, alpha_bar, cfg)
                rms = (x - clean).flatten(1).norm(dim=1) / math.sqrt(x[0].numel())  # (B,) per-pixel RMS change
                out[f"{name}/{kind}/{gamma}"] = rms.mean().item()
                images[f"{name}/{kind}/{gamma}"] = x
    return out, images


# ----------------------------------------------------------------------------------------------------------------
# Report: Markdown tables and one PNG


def markdown(results: dict, cfg, info: dict) -> str:
    names = list(results)
    head = "| " + " | ".join(names) + " |"
    rule = "| --- | --- |" + " --- |" * len(names)
    lines = ["# Robustness of the denoiser on shapes", "",
             "| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key in ("data batches", "optimizer steps", "mean l2 norm of delta in training (last log)",
                "l2 radius eta*sqrt(d)"):
        lines.append(f"| {key} | " + " | ".join(str(info[n][key]) for n in names) + " |")
    lines += ["", f"Denoiser error: per-pixel MSE (x 1e-3) of x0_hat against x0, {cfg.n_images} held-out images; "
              f"perturbation radius gamma*sqrt(d) in VP space; PGD = {cfg.pgd_steps} l2 steps maximising the change "
              f"of x0_hat. Lower is better.", "", "| t | perturbation " + head, rule]
    for t in cfg.t:
        keys = [f"{t}/none/0"] + [f"{t}/{k}/{g}" for k in ("random", "pgd") for g in cfg.gamma]
        for key in keys:
            _, kind, gamma = key.split("/")
            label = "none" if kind == "none" else f"{kind} gamma={gamma}"
            cells = [f"{1e3 * results[n]['denoiser'][key]:.2f}" for n in names]
            lines.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Sampler stability: RMS per pixel (in [-1, 1] units, x 1e-2) between final samples with and "
              f"without a perturbation of every network input; {cfg.n_samples} samples, NFE {cfg.nfe}, same seeds. "
              f"Lower is more stable.", "", "| sampler | perturbation " + head, rule]
    for key in results[names[0]]["sampler"]:
        name, kind, gamma = key.split("/")
        cells = [f"{100 * results[n]['sampler'][key]:.2f}" for n in names]
        lines.append(f"| {name} | {kind} gamma={gamma} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)


def draw(results: dict, images: dict, cfg, path: str) -> None:
    """Denoiser MSE vs gamma per t (random, PGD), sampler change vs gamma, and clean / PGD-perturbed DDIM samples."""
    from PIL import Image

    names = list(results)
    colors = {n: figures.COLORS[i] for i, n in enumerate(names)}
    n_t, panel = len(cfg.t), 280
    strip = min(cfg.n_samples, 8)
    width = max(panel * max(n_t, 2) + 20, 10 + strip * 34 * 2 + 200)
    height = 50 + 2 * 250 + 250 + 30 + len(names) * 40 + 20
    image = figures.new_figure(width, height)
    figures.title(image, (10, 8), "shapes: denoiser error under input perturbations, and sampler stability", 14)
    figures.legend(image, (10, 28), [(n, colors[n]) for n in names])
    gammas = [0.0] + list(cfg.gamma)
    for row, kind in enumerate(("random", "pgd")):
        for col, t in enumerate(cfg.t):
            series = [dict(name=n, x=gammas, color=colors[n],
                           y=[1e3 * results[n]["denoiser"][f"{t}/none/0"]] +
                             [1e3 * results[n]["denoiser"][f"{t}/{kind}/{g}"] for g in cfg.gamma]) for n in names]
            box = (10 + panel * col, 50 + 250 * row, panel * (col + 1), 50 + 250 * row + 240)
            figures.line_panel(image, box, series, f"t = {t}, {kind}: MSE x 1e-3", "gamma (RMS per pixel)", "")
    y = 50 + 2 * 250
    for col, name in enumerate(("ddim", "ddpm")):
        series = [dict(name=f"{n} {kind}", x=[0.0] + list(cfg.sampler_gamma), color=colors[n],
                       y=[0.0] + [100 * results[n]["sampler"][f"{name}/{kind}/{g}"] for g in cfg.sampler_gamma])
                  for n in names for kind in ("pgd",)]
        figures.line_panel(image, (10 + panel * col, y, panel * (col + 1), y + 240), series,
                           f"{name} {cfg.nfe}: PGD change x 1e-2", "gamma", "")
    y += 250
    gamma = max(cfg.sampler_gamma)
    figures.title(image, (10, y), f"DDIM {cfg.nfe} samples: clean (left) and PGD gamma={gamma} at every call (right)")
    for row, n in enumerate(names):
        top = y + 20 + 40 * row
        figures.title(image, (10, top + 10), n, 11)
        for k, key in enumerate(("ddim/clean", f"ddim/pgd/{gamma}")):
            for i, img in enumerate(to_uint8(images[n][key][:strip])):
                tile = Image.fromarray(img)
                image.paste(tile, (200 + k * (strip * 34 + 20) + 34 * i, top))
    image.save(path, optimize=True)


def training_info(ckpt: dict, path: str) -> dict:
    """Budget of a run from its checkpoint args and its metrics.jsonl (the last logged mean ||delta||)."""
    args = ckpt["args"]
    metrics = os.path.join(os.path.dirname(path), "metrics.jsonl")
    delta = "n/a"
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = f.read().splitlines()
        delta = f"{json.loads(lines[-1])['delta_norm']:.3f}" if lines else "n/a"
    d = 3 * 32 * 32
    k = max(args["adv_steps"], 1)
    return {"data batches": ckpt["step"], "optimizer steps": ckpt["step"] * k,
            "mean l2 norm of delta in training (last log)": delta if args["adv_steps"] else "0 (no AT)",
            "l2 radius eta*sqrt(d)": f"{attacks.l2_radius(args['adv_budget'], d):.2f}" if args["adv_steps"] else "-"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--train", action="store_true", help="train standard / AT / AT-sqrt_d checkpoints with dpm_at.py first")
    a("--std", default=None, help="a standard checkpoint (instead of --train)")
    a("--at", nargs="+", default=[], help="one or more AT checkpoints (instead of --train)")
    a("--run-dir", default="runs/robustness", help="--train: where the runs go; default runs/robustness")
    a("--at-batches", type=int, default=300, help="--train: AT batches; standard gets K times as many; default 300")
    a("--adv-steps", type=int, default=3, help="--train: K (docs/method.md §4.4); default 3")
    a("--t", type=int, nargs="+", default=[50, 200, 500], help="VP steps of the denoiser test; default 50 200 500")
    a("--gamma", type=float, nargs="+", default=[0.02, 0.05, 0.1], help="RMS budgets; default 0.02 0.05 0.1")
    a("--sampler-gamma", type=float, nargs="+", default=[0.02, 0.05], help="budgets in the sampler; default 0.02 0.05")
    a("--pgd-steps", type=int, default=5, help="l2-PGD steps (docs/method.md §6); default 5")
    a("--nfe", type=int, default=10, help="sampler steps (DDIM 'ddimN', DDPM 'N'); default 10")
    a("--n-images", type=int, default=64, help="held-out images for the denoiser test; default 64")
    a("--n-samples", type=int, default=32, help="samples per sampler run; default 32")
    a("--seed", type=int, default=0, help="training seed, and the seed of every noise here; default 0")
    a("--threads", type=int, default=1, help="torch CPU threads; default 1")
    a("--out", default=OUT, help=f"output folder; default {OUT}")
    a("--quick", action="store_true", help="tiny sizes for the test (--tiny runs of 2 AT batches, 4 images)")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.at_batches, cfg.t, cfg.gamma, cfg.sampler_gamma = 2, [200], [0.05], [0.05]
        cfg.pgd_steps, cfg.nfe, cfg.n_images, cfg.n_samples = 2, 3, 4, 4
    if not cfg.train and not (cfg.std and cfg.at):
        p.error("pass --train, or --std CKPT and --at CKPT [CKPT ...]")
    return cfg


def check(cfg: argparse.Namespace) -> None:
    """Every value and path of the command, before any training or evaluation: one line names a bad one."""
    counts = dict(at_batches=cfg.at_batches, adv_steps=cfg.adv_steps, pgd_steps=cfg.pgd_steps, nfe=cfg.nfe,
                  n_images=cfg.n_images, n_samples=cfg.n_samples, threads=cfg.threads)
    for key, value in counts.items():
        if value < 1:
            raise dpm_at.UserError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    for key, values in dict(gamma=cfg.gamma, sampler_gamma=cfg.sampler_gamma).items():
        if not all(0 <= v < math.inf for v in values):
            raise dpm_at.UserError(f"--{key.replace('_', '-')} budgets must be >= 0 and finite, got {values}")
    if not 0 <= cfg.seed < 2**63:
        raise dpm_at.UserError(f"--seed must lie in [0, 2**63), got {cfg.seed}")
    T = 1000  # --train makes dpm_at.py's default T; a given checkpoint brings its own
    for path in [] if cfg.train else [cfg.std, *cfg.at]:
        ckpt = dpm_at.load_checkpoint(path)  # a dpm_at.py checkpoint whose weights fit its network
        dpm_at.check_fits_data(ckpt["net"], (3, 32, 32), path, "shapes")
        T = min(T, ckpt.get("diffusion_steps", 1000))
    if not all(0 <= t < T for t in cfg.t):
        raise dpm_at.UserError(f"--t must lie in 0..{T - 1} (the checkpoints' VP steps), got {cfg.t}")
    for folder in (cfg.out, cfg.run_dir):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise dpm_at.UserError(f"{folder} is a file; give a folder")


def main(cfg: argparse.Namespace, argv: list[str]) -> None:
    check(cfg)
    torch.set_num_threads(cfg.threads)
    start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.train:
        paths = train_runs(cfg)
    else:  # name the AT runs after their folders
        paths = {"standard": cfg.std, **{f"AT ({os.path.basename(os.path.dirname(p)) or p})": p for p in cfg.at}}
    # held-out images (a seed the training set never used), as x0 in [-1, 1]: (N, 3, 32, 32)
    x0 = torch.from_numpy(data.make_shapes(cfg.n_images, seed=10_000 + cfg.seed)).permute(0, 3, 1, 2) / 127.5 - 1
    results, images, info = {}, {}, {}
    for name, path in paths.items():
        t0 = time.time()
        ckpt, net = sampler.load_model(path)
        alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta(ckpt["schedule"], ckpt.get("diffusion_steps", 1000)))
        denoise = make_denoiser(ckpt, net, alpha_bar)
        results[name] = {"denoiser": denoiser_errors(denoise, x0, alpha_bar, cfg)}
        results[name]["sampler"], images[name] = sampler_changes(denoise, x0.shape[1:], alpha_bar, cfg)
        info[name] = training_info(ckpt, path)
        print(f"{name}: evaluated in {time.time() - t0:.0f} s", flush=True)
    report = markdown(results, cfg, info)
    report += f"\nCommand: `python experiments/robustness.py {' '.join(argv)}`; {time.time() - start:.0f} s in all.\n"
    stem = os.path.join(cfg.out, "shapes")
    with open(stem + ".md", "w") as f:
        f.write(report)
    with open(stem + ".json", "w") as f:
        json.dump(dict(config=vars(cfg), checkpoints=paths, info=info, results=results), f, indent=1)
    draw(results, images, cfg, stem + ".png")
    print(report)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png in {time.time() - start:.0f} s")


def cli(argv=None) -> int:
    """The command line: bad input ends in one `error:` line on stderr and exit code 1, never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        main(parse_args(argv), argv)
    except (dpm_at.UserError, data.DatasetError, sampler.SamplerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
