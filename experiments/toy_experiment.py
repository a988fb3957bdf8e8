"""Does AT on x_t help few-step sampling? Standard vs AT vs input perturbation on 2-D data, on a laptop CPU.

Paper: Wang et al. 2025, arXiv:2502.17099v1; claim (1) of the abstract and Sec. 3: the sampler's x_t drifts from
       q(x_t) ("exposure bias"), and DRO over a ball around q(x_t), i.e. AT on x_t (Sec. 4; docs/method.md §4),
       shrinks the gap between generated and data distributions when sampling with few steps.
Borrowed: DDPM-IP baseline (Ning et al. 2023, Alg. 1); the variance view of exposure bias (Ning et al. 2024,
          "Elucidating the exposure bias in diffusion models", Sec. 3); sliced Wasserstein distance (Rabin et al.
          2011; Bonneel et al. 2015, Eq. 4).
Uses: data.py, unet.py, sampler.py, dpm_at.py (make_losses, train_step, fast_path), figures.py.     Used by: nothing.

    python experiments/toy_experiment.py          # ring, 3 seeds x 4 methods (~13 min): experiments/results/toy/ring.*
    python experiments/toy_experiment.py --sweep  # AT's eta / alpha / K one at a time (~20 min): .../ring_sweep.*
    python experiments/toy_experiment.py --budget batches  # all see 2400 batches (~17 min): .../ring_batches.*
    python experiments/toy_experiment.py --quick --out /tmp/toy   # seconds: the whole pipeline at toy sizes (the test)

Design. Every method trains the same MLP (unet "mlp2d") from the same seed with the same number of optimizer steps:
AT with K passes makes K optimizer steps per data batch (Shafahi et al. 2019, Alg. 1; docs/method.md §4.4), so
standard and IP get K times its batches (matched optimizer steps = matched forward/backward passes; AT sees 1/K of
the data batches); --budget batches matches the data batches instead (AT then costs K times the compute). "replay"
is AT with alpha = 0 (delta stays 0): AT's batches and passes without the perturbation, which separates the two
effects.
Each EMA model samples n_eval points with DDPM ancestral (respacing "N", fixed_small variance), DDIM ("ddimN") and
Heun (Karras grid, D clipped to [-1, 1]) at NFE 5, 10, 20, 50 (Heun: N = (NFE + 1)//2 grid points, i.e. NFE 5, 9,
19, 49), all methods from the same initial noise. The distance to n_eval fresh data points is the sliced
2-Wasserstein distance; the row "data vs data" is its floor at this sample size. Exposure bias is measured as the
variance of the sampler's state over that of q at the same noise level.

Symbols: sliced W2 -> sw2, projection directions -> u, K -> adv_steps, alpha -> adv_step_size, eta -> adv_budget,
         DDPM-IP gamma -> ip_gamma, data batches of AT -> at_batches.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: the components
import data  # noqa: E402
import dpm_at  # noqa: E402
import figures  # noqa: E402
import sampler  # noqa: E402
import unet  # noqa: E402

NFES = (5, 10, 20, 50)
SAMPLERS = ("ddpm", "ddim", "heun")
EXPOSURE_NFE = 10
OUT = os.path.join("experiments", "results", "toy")  # relative to the working directory: run from the repo root


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256) -> float:
    """Sliced 2-Wasserstein distance between two equal-size 2-D point clouds (N, 2).

    Bonneel et al. 2015, Eq. 4: SW2^2 = E_u W2^2(u.x, u.y) over directions u on the circle; in 1-D, W2^2 between two
    empirical measures of N points each is the mean squared difference of the sorted values. We use n_proj evenly
    spaced angles in [0, pi) (u and -u give the same W2) instead of random ones, so the number is deterministic;
    for N(m1, I) vs N(m2, I) it is exactly |m1 - m2| / sqrt(2), because the mean of cos^2 over those angles is 1/2.
    """
    if x.shape != y.shape or x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"need two (N, 2) point sets of the same size, got {tuple(x.shape)} and {tuple(y.shape)}")
    angle = torch.arange(n_proj, dtype=torch.float64) * math.pi / n_proj
    u = torch.stack([angle.cos(), angle.sin()], 1)  # (P, 2)
    px, _ = torch.sort(x.double() @ u.T, dim=0)  # (N, P) sorted projections
    py, _ = torch.sort(y.double() @ u.T, dim=0)
    return ((px - py) ** 2).mean().sqrt().item()


# ----------------------------------------------------------------------------------------------------------------
# Training: dpm_at.train_step on 2-D points, one function for every method


def method_table(cfg) -> dict:
    """name -> (keywords of the method, data batches, optimizer steps per batch). --budget steps (default): every
    method makes K * at_batches optimizer steps; --budget batches: every method sees K * at_batches data batches, so a
    method with k passes makes k times as many optimizer steps (the paper's own count: 200K AT batches in the
    authors' released code, cifar_adv_train.sh). The keywords are dpm_at.train_step's, plus input_perturbation."""
    K, n = cfg.adv_steps, cfg.at_batches

    def batches(k):  # data batches of a method with k optimizer steps per batch
        return K * n if cfg.budget == "batches" else K * n // k

    at = dict(adv_steps=K, adv_step_size=cfg.adv_step_size, adv_budget=cfg.adv_budget)
    table = {"standard": (dict(adv_steps=0), K * n, 1)}
    if not cfg.sweep:
        # the control for AT's minibatch replay: the same K passes over the same batches, but delta stays 0
        table["replay"] = (dict(at, adv_step_size=0.0), batches(K), K)
        table["AT"] = (at, batches(K), K)
        table["IP"] = (dict(adv_steps=0, input_perturbation=cfg.ip_gamma), K * n, 1)
        return table
    # one knob at a time around the released defaults (docs/method.md §4.3-4.4)
    table[f"AT eta={cfg.adv_budget} a={cfg.adv_step_size} K={K}"] = (at, batches(K), K)
    for eta in cfg.sweep_eta:
        table[f"AT eta={eta}"] = (dict(at, adv_budget=eta), batches(K), K)
    for alpha in cfg.sweep_alpha:
        table[f"AT alpha={alpha}"] = (dict(at, adv_step_size=alpha), batches(K), K)
    for k in cfg.sweep_k:
        table[f"AT K={k}"] = (dict(at, adv_steps=k), batches(k), k)
    return table


def train(method: dict, batches: int, points: torch.Tensor, seed: int, cfg) -> torch.nn.Module:
    """Train the mlp2d network with dpm_at.py's step (ddpm loss, cosine schedule, uniform t, l2 ball, target
    delta_detach: the defaults of the 2-D runs of dpm_at.py) and the method's keywords; returns the EMA network."""
    step_kwargs = dict(method)
    input_perturbation = step_kwargs.pop("input_perturbation", 0.0)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # draws the batches, then t, eps (and xi) of every batch
    net = unet.build_from_config(unet.preset_config("mlp2d", in_channels=2))
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    train_net, opt = dpm_at.fast_path(net, "cpu", cfg.lr)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    noise_fn, loss_fn = dpm_at.make_losses("ddpm", alpha_bar, generator, input_perturbation=input_perturbation)
    for _ in range(batches):
        x0 = data.random_batch(points, cfg.batch_size, generator)
        dpm_at.train_step(train_net.train(), ema, opt, x0, noise_fn, loss_fn, ema_decay=cfg.ema_decay, **step_kwargs)
    return ema


# ----------------------------------------------------------------------------------------------------------------
# Sampling, the distance, and the variance of the sampler's states


def recording(denoise, log: dict):
    """D that also records tr Cov of every input state, keyed by sigma (Heun's corrected state overwrites its
    predictor, so each sigma keeps the state the sampler actually carries)."""

    def D(x_e, sigma):
        log[sigma[0].item()] = x_e.double().var(0).sum().item()
        return denoise(x_e, sigma)

    return D


def run_sampler(name: str, nfe: int, denoise, z: torch.Tensor, alpha_bar, generator) -> torch.Tensor:
    """x_0 samples (N, 2) from z ~ N(0, I) with one of SAMPLERS at about nfe network calls (sampler.py)."""
    if name == "ddpm":
        # Deviation from sampler.py's CLI default (fixed_large): with 5-10 steps fixed_large leaves noise of std ~0.4
        # from the second-to-last step in the output; IDDPM learns the variance instead, we take fixed_small.
        return sampler.ddpm_sample(denoise, z, alpha_bar, sampler.respace(str(nfe)), generator, variance="fixed_small")
    if name == "ddim":
        return sampler.ddim_sample(denoise, z, alpha_bar, sampler.respace(f"ddim{nfe}"))
    sigmas = sampler.karras_sigmas((nfe + 1) // 2)  # EDM: N points cost 2N - 1 calls

    def clipped(x, sigma):
        # Deviation from EDM Alg. 2: D clipped to the data range [-1, 1], as the VP samplers clip x0_hat
        # (docs/method.md §2.7), so that one bad D at a large sigma cannot blow the state up (unclipped we saw Var
        # ratios of 1e4 at NFE 9). It does not cure Heun's own error with 3-5 grid points (on a 1-D Gaussian, Heun
        # with N = 5 from x = 80 ends at 1.26 where the exact ODE ends at 0.50: tests/test_sampler.py).
        return denoise(x, sigma).clamp(-1, 1)

    return sampler.edm_sample(clipped, sigmas[0] * z, sigmas).clamp(-1, 1)


def exposure_curve(log: dict, samples: torch.Tensor, var_x0: float) -> list[tuple[float, float]]:
    """(sigma, Var[state] / Var[q at sigma]) along the trajectory, the final samples last at sigma = 0.

    Exposure bias as in Ning et al. 2024, Sec. 3: the sampler's x_t has a different variance from q(x_t). In EDM
    space x_e = x_0 + sigma eps, so tr Cov q = tr Cov x_0 + d sigma^2 (d = 2); VP states have the same ratio.
    """
    curve = [(s, v / (var_x0 + 2 * s**2)) for s, v in sorted(log.items(), reverse=True)]
    return curve + [(0.0, samples.double().var(0).sum().item() / var_x0)]


def evaluate(ema, seed: int, fresh: torch.Tensor, var_x0: float, cfg) -> dict:
    """SW2 per (sampler, NFE) and the exposure curve per sampler at EXPOSURE_NFE, for one trained model."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    denoise = sampler.vp_denoiser(ema, alpha_bar)
    out = {"sw2": {}, "exposure": {}}
    for s_index, name in enumerate(SAMPLERS):
        for nfe in cfg.nfe:
            # the same initial noise and sampler noise for every method (common random numbers)
            generator = torch.Generator().manual_seed(1000 * seed + 10 * s_index + nfe)
            z = torch.randn(cfg.n_eval, 2, generator=generator, dtype=torch.float64).float()
            log = {}
            with torch.no_grad():
                x = run_sampler(name, nfe, recording(denoise, log), z, alpha_bar, generator)
            out["sw2"][f"{name}/{nfe}"] = sliced_wasserstein(x, fresh)
            if nfe == EXPOSURE_NFE:
                out["exposure"][name] = exposure_curve(log, x, var_x0)
            out.setdefault("scatter", {})[f"{name}/{nfe}"] = x[: cfg.n_scatter].tolist()
    return out


def exposure_gap(curve) -> tuple[float, float]:
    """Mean |ratio - 1| over the states the sampler produced (the initial noise excluded), and the final ratio."""
    ratios = [r for _, r in curve[1:]]
    return float(np.mean(np.abs(np.array(ratios) - 1))), curve[-1][1]


# ----------------------------------------------------------------------------------------------------------------
# Tables and the figure


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def markdown(results: dict, floor: list[float], cfg, seconds: dict) -> str:
    methods = list(results)
    seeds = len(next(iter(results.values())))
    heun = {n: 2 * ((n + 1) // 2) - 1 for n in cfg.nfe}
    lines = [f"# Toy experiment: {cfg.dataset}, {seeds} seeds, mean ± std", "",
             f"Sliced W2 (x 1e-2, {cfg.n_proj} directions) between {cfg.n_eval} samples and {cfg.n_eval} fresh data "
             f"points; lower is better. Heun uses NFE {', '.join(str(heun[n]) for n in cfg.nfe)}.", "",
             "| sampler | method | " + " | ".join(f"NFE {n}" for n in cfg.nfe) + " |",
             "| --- | --- |" + " --- |" * len(cfg.nfe)]
    for name in SAMPLERS:
        for m in methods:
            cells = [mean_std([100 * r["sw2"][f"{name}/{n}"] for r in results[m]]) for n in cfg.nfe]
            lines.append(f"| {name} | {m} | " + " | ".join(f"{a:.2f} ± {b:.2f}" for a, b in cells) + " |")
    a, b = mean_std([100 * f for f in floor])
    lines += ["| - | data vs data | " + " | ".join([f"{a:.2f} ± {b:.2f}"] * len(cfg.nfe)) + " |", "",
              f"Exposure bias at NFE {EXPOSURE_NFE} (Heun {heun.get(EXPOSURE_NFE, 9)}): Var[state] / Var[q] along "
              "the trajectory; mean |ratio - 1| over the produced states, and the ratio of the final samples "
              "(1 = the data's variance).", "",
              "| sampler | method | mean abs(ratio - 1) | final ratio |", "| --- | --- | --- | --- |"]
    for name in SAMPLERS:
        for m in methods:
            gaps = [exposure_gap(r["exposure"][name]) for r in results[m]]
            (g, gs), (f, fs) = mean_std([x[0] for x in gaps]), mean_std([x[1] for x in gaps])
            lines.append(f"| {name} | {m} | {g:.3f} ± {gs:.3f} | {f:.3f} ± {fs:.3f} |")
    lines += ["", "| method | data batches | optimizer steps | train seconds per seed |", "| --- | --- | --- | --- |"]
    for m, (_, batches, k) in method_table(cfg).items():
        lines.append(f"| {m} | {batches} | {batches * k} | {seconds[m] / seeds:.0f} |")
    return "\n".join(lines) + "\n"


def draw(results: dict, floor: list[float], cfg, path: str) -> None:
    """Scatter panels (first seed) per method, sampler and NFE (--sweep: the smallest NFE and NFE 10 only), SW2 vs
    NFE, and the exposure curves."""
    methods = list(results)
    colors = {m: figures.COLORS[i % len(figures.COLORS)] for i, m in enumerate(methods)}
    cols = [(name, n) for name in SAMPLERS for n in (sorted({cfg.nfe[0], EXPOSURE_NFE}) if cfg.sweep else cfg.nfe)]
    cell = 104 if cfg.sweep else 92
    width = max(110 + cell * len(cols), 3 * 300 + 20)
    pw = (width - 20) // 3  # width of a line panel
    entries = [(m, colors[m]) for m in methods]
    legend_rows = figures.legend(figures.new_figure(width, 400), (10, 30), entries)  # a dry run, to size the figure
    height = 60 + 18 * (legend_rows - 1) + cell * (len(methods) + 1) + 2 * 250 + 20
    image = figures.new_figure(width, height)
    figures.title(image, (10, 8), f"{cfg.dataset}: samples (seed {cfg.seeds[0]}), sliced W2 vs NFE, and "
                                  f"Var[state]/Var[q] along the NFE-{EXPOSURE_NFE} trajectory", 14)
    figures.legend(image, (10, 30), entries)
    top = 70 + 18 * (legend_rows - 1)
    fresh = data.make_points(cfg.dataset, cfg.n_scatter, seed=10_000)
    figures.scatter_panel(image, (110, top, 110 + cell - 6, top + cell - 6), fresh, "data")
    for row, m in enumerate(methods):
        y = top + cell * (row + 1)
        figures.title(image, (8, y + cell // 2 - 8), m[:16], 11)
        for c, (name, n) in enumerate(cols):
            x = 110 + cell * c
            label = f"{name} {2 * ((n + 1) // 2) - 1 if name == 'heun' else n}" if row == 0 else ""
            pts = np.asarray(results[m][0]["scatter"][f"{name}/{n}"])
            figures.scatter_panel(image, (x, y + 10, x + cell - 6, y + cell + 4), pts, label, color=colors[m])
    y0 = top + cell * (len(methods) + 1) + 20
    for i, name in enumerate(SAMPLERS):
        series = []
        for m in methods:
            stats = [mean_std([100 * r["sw2"][f"{name}/{n}"] for r in results[m]]) for n in cfg.nfe]
            series.append(dict(name=m, x=list(cfg.nfe), y=[s[0] for s in stats], err=[s[1] for s in stats],
                               color=colors[m]))
        figures.line_panel(image, (10 + pw * i, y0, pw * (i + 1), y0 + 240), series, f"{name}: sliced W2 x 1e-2",
                           "NFE" + (" (Heun: 2N-1 of these)" if name == "heun" else ""), "", xlog=True,
                           hline=100 * float(np.mean(floor)))
        series = []
        for m in methods:
            curves = np.array([[r for _, r in res["exposure"][name]] for res in results[m]])  # (seeds, states)
            steps = list(range(curves.shape[1]))
            series.append(dict(name=m, x=steps, y=list(curves.mean(0)), err=list(curves.std(0)), color=colors[m]))
        figures.line_panel(image, (10 + pw * i, y0 + 250, pw * (i + 1), y0 + 490), series,
                           f"{name}: Var[state] / Var[q]", "sampler state (last = output)", "", hline=1.0)
    image.save(path, optimize=True)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dataset", default="ring", choices=list(data.POINT_SETS), help="2-D point set (data.py); default ring")
    a("--seeds", type=int, nargs="+", default=None, help="training / sampling seeds; default 0 1 2, and 100 101 "
                                                          "for --sweep (so that the sweep does not tune on them)")
    a("--at-batches", type=int, default=800, help="data batches of AT; standard and IP get K times as many "
                                                   "(matched optimizer steps); default 800")
    a("--budget", default="steps", choices=["steps", "batches"],
      help="what every method gets the same of: optimizer steps (default; = forward/backward passes) or data "
           "batches (AT then makes K times the steps); results go to <dataset>[_sweep][_batches].*")
    a("--adv-steps", type=int, default=3, help="K (docs/method.md §4.4; released default 3)")
    a("--adv-step-size", type=float, default=0.1, help="alpha, absolute l2 step (docs/method.md §4.3; released "
                                                        "default 0.1)")
    a("--adv-budget", type=float, default=0.1, help="eta, radius eta*sqrt(d) (docs/method.md §4.3; released "
                                                     "default 0.1)")
    a("--ip-gamma", type=float, default=0.1, help="DDPM-IP gamma (Ning et al. 2023); default 0.1")
    a("--batch-size", type=int, default=256, help="points per batch; default 256")
    a("--lr", type=float, default=3e-3, help="AdamW learning rate; default 3e-3")
    a("--ema-decay", type=float, default=0.995, help="EMA decay per optimizer step; default 0.995")
    a("--nfe", type=int, nargs="+", default=None, help="network calls per sample; default 5 10 20 50 (--quick: 5 10)")
    a("--n-eval", type=int, default=10_000, help="samples (and fresh data points) per distance; default 10000")
    a("--n-proj", type=int, default=256, help="directions of the sliced W2; default 256")
    a("--n-scatter", type=int, default=2000, help="points per scatter panel; default 2000")
    a("--threads", type=int, default=1, help="torch CPU threads; default 1 (fastest on a busy 2-core machine)")
    a("--out", default=OUT, help=f"output folder; default {OUT}")
    a("--sweep", action="store_true", help="instead of standard/AT/IP: AT with eta, alpha, K varied one at a time")
    a("--sweep-eta", type=float, nargs="*", default=[0.003, 0.01, 0.03], help="--sweep: eta values; default "
                                                                             "0.003 0.01 0.03")
    a("--sweep-alpha", type=float, nargs="*", default=[0.0, 0.003, 0.01, 0.03], help="--sweep: alpha values; "
      "default 0 0.003 0.01 0.03 (0: delta stays 0, so K passes only replay the batch: the control for AT's "
      "repeated batches)")
    a("--sweep-k", type=int, nargs="*", default=[2, 5], help="--sweep: K values; default 2 5")
    a("--quick", action="store_true", help="toy sizes (2 seeds, 10 AT batches, 500 points, NFE 5 and 10): for the "
                                           "test")
    cfg = p.parse_args(argv)
    if cfg.seeds is None:
        cfg.seeds = [100, 101] if cfg.sweep else [0, 1, 2]
    if cfg.nfe is None:
        cfg.nfe = [5, EXPOSURE_NFE] if cfg.quick else list(NFES)
    if cfg.quick:
        cfg.seeds, cfg.at_batches, cfg.batch_size, cfg.n_eval, cfg.n_scatter = cfg.seeds[:2], 10, 64, 500, 300
    if EXPOSURE_NFE not in cfg.nfe:
        p.error(f"--nfe must include {EXPOSURE_NFE} (the exposure-bias measurement)")
    return cfg


def main(cfg: argparse.Namespace, argv: list[str]) -> None:
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    start = time.time()
    # tr Cov of x_0 from a million fresh points (standard error ~0.1%): the variance of q(x_t) follows from it
    var_x0 = float(np.var(data.make_points(cfg.dataset, 1_000_000, seed=99_999), axis=0).sum())
    table = method_table(cfg)
    results, seconds = {m: [] for m in table}, {m: 0.0 for m in table}
    floor = []
    for seed in cfg.seeds:
        points = data.load_dataset(cfg.dataset, seed=seed)  # the training set, 100,000 points
        fresh = torch.from_numpy(data.make_points(cfg.dataset, cfg.n_eval, seed=10_000 + seed))
        floor.append(sliced_wasserstein(fresh, torch.from_numpy(data.make_points(cfg.dataset, cfg.n_eval,
                                                                                 seed=20_000 + seed)), cfg.n_proj))
        for m, (flags, batches, _) in table.items():
            t0 = time.time()
            ema = train(flags, batches, points, seed, cfg)
            seconds[m] += time.time() - t0
            results[m].append(evaluate(ema, seed, fresh, var_x0, cfg))
            sw2 = "  ".join(f"{k} {100 * v:.2f}" for k, v in results[m][-1]["sw2"].items())
            print(f"seed {seed} {m}: trained {time.time() - t0:.0f}s incl. sampling | SW2 x1e-2: {sw2}", flush=True)
    suffix = ("_sweep" if cfg.sweep else "") + ("_batches" if cfg.budget == "batches" else "")
    stem = os.path.join(cfg.out, cfg.dataset + suffix)
    command = "python experiments/toy_experiment.py " + " ".join(argv)
    report = markdown(results, floor, cfg, seconds)
    report += f"\nCommand: `{command.strip()}`; {time.time() - start:.0f} s in all, {cfg.threads} thread(s).\n"
    with open(stem + ".md", "w") as f:
        f.write(report)
    with open(stem + ".json", "w") as f:
        json.dump(dict(config=vars(cfg), floor=floor, var_x0=var_x0,
                       results={m: [{k: v for k, v in r.items() if k != "scatter"} for r in rs]
                                for m, rs in results.items()}), f, indent=1)
    draw(results, floor, cfg, stem + ".png")
    print(report)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(parse_args(), sys.argv[1:])
