"""dpm_at.py: the AT losses, the free-AT step against an independent float64 reference, the t-sampler, the
training loop's checkpoints and the command line."""
import argparse
import copy
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dpm_at
import sampler
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A toy batch (B = 2, d = 4) used by the reference checks below; t = 499 of the cosine schedule.
X0 = [[0.5, -0.25, 0.1, 0.8], [-0.6, 0.2, 0.9, -0.1]]
EPS = [[1, -0.5, 0.3, 0], [0.2, 0.7, -1.1, 0.4]]


def cosine_alpha_bar(t: int, T: int = 1000) -> float:
    """IDDPM Eq. 17 in closed form: alpha_bar_t = f((t + 1)/T) / f(0), f(u) = cos^2((u + 0.008)/1.008 * pi/2)."""
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return f((t + 1) / T) / f(0)


class ScalarModel(torch.nn.Module):
    """eps_theta(x, t) = a * x: a model whose loss gradients have closed forms (see reference_free_at)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x, t):
        return self.a * x


def reference_free_at(target, eta, K=3, alpha=0.1, lr=0.1, a=0.5):
    """The released free-AT loop, written out in numpy for eps_theta = a*x and plain SGD. With u = x_t + delta and
    residual r = target - a u, L = mean(r^2), so dL/da = mean(-2 r u) and dL/ddelta = 2 r (c - a) / (B d), where
    c = 1/sqrt(1 - ab) for target `delta` and c = 0 when the shift is detached (`delta_detach`) or absent
    (`original`). Each pass: ascent step delta += alpha g/||g|| and projection to ||delta|| <= eta sqrt(d) (not on
    the last pass), then a -= lr dL/da. Returns the a after each pass, the losses, and the final delta."""
    x0, eps = np.array(X0), np.array(EPS, dtype=float)
    ab = cosine_alpha_bar(499)
    s1 = math.sqrt(1 - ab)
    x_t = math.sqrt(ab) * x0 + s1 * eps
    delta, trace, losses = np.zeros_like(x_t), [], []
    for k in range(K):
        u = x_t + delta
        r = (eps if target == "original" else eps + delta / s1) - a * u
        losses.append(float((r**2).mean()))
        grad_a = float((-2 * r * u).mean())
        if k < K - 1:
            g = 2 * r * ((1 / s1 if target == "delta" else 0.0) - a) / r.size
            delta = delta + alpha * g / np.linalg.norm(g, axis=1, keepdims=True)
            norm = np.linalg.norm(delta, axis=1, keepdims=True)
            delta = delta * np.minimum(1.0, eta * 2 / norm)  # radius eta * sqrt(d), d = 4
        a -= lr * grad_a
        trace.append(a)
    return trace, losses, delta


def run_free_at(target, eta, **kw):
    """dpm_at.train_step on the toy batch at a fixed t = 499, recording a after each optimizer step."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    x0 = torch.tensor(X0, dtype=torch.float64)
    eps = torch.tensor(EPS, dtype=torch.float64)
    t = torch.tensor([499, 499])
    x_t = sampler.q_sample(x0, t, eps, alpha_bar)
    net = ScalarModel()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trace, losses, deltas = [], [], []
    opt.step = (lambda step: lambda *a, **k: (step(*a, **k), trace.append(net.a.item())))(opt.step)

    def loss_fn(net_, x0_, x_t_, t_, eps_, delta):
        deltas.append(delta.detach().clone())
        loss = dpm_at.ddpm_loss(net_, x0_, x_t_, t_, eps_, delta, alpha_bar, target)
        losses.append(loss.mean().item())
        return loss

    out = dpm_at.train_step(net, copy.deepcopy(net), opt, x0, lambda _: (x_t, t, eps, 1.0), loss_fn,
                            adv_budget=eta, **kw)
    return trace, losses, deltas, out


@pytest.mark.parametrize("target, eta", [("delta_detach", 0.1), ("delta_detach", 0.03), ("delta", 0.1),
                                         ("original", 0.1)])
def test_free_at_matches_reference_loop(target, eta):
    """train_step (Wang et al. 2025 Sec. 4, the released loop) matches the closed-form float64 reference: a after
    each of the K = 3 optimizer steps, each pass's loss and the final delta. eta = 0.03 (radius 0.06) makes the
    projection bind; eta = 0.1 (radius 0.2) does not."""
    trace, losses, deltas, (clean, last, delta_norm) = run_free_at(target, eta)
    ref_trace, ref_losses, ref_delta = reference_free_at(target, eta)
    assert trace == pytest.approx(ref_trace, abs=1e-12)
    assert losses == pytest.approx(ref_losses, abs=1e-12)
    assert deltas[-1].numpy() == pytest.approx(ref_delta, abs=1e-12)
    assert deltas[0].abs().max() == 0  # pass 0 sees the clean x_t
    assert clean.item() == pytest.approx(losses[0]) and last.item() == pytest.approx(losses[-1])
    assert delta_norm.item() == pytest.approx(np.linalg.norm(ref_delta, axis=1).mean())


def test_free_at_known_values():
    """Pinned values of reference_free_at (the independent numpy loop above, float64, written down when it was first
    run), so that a change to both the code and the reference cannot pass unnoticed; `delta` ascends opposite to
    `delta_detach` on this batch (their delta-gradients have opposite signs, docs/method.md §4.2)."""
    trace, losses, deltas, _ = run_free_at("delta_detach", 0.1)
    assert trace == pytest.approx([0.5218555234, 0.5359202413, 0.5437927397], abs=1e-9)
    assert losses == pytest.approx([0.2218852794, 0.1800495487, 0.1455837206], abs=1e-9)
    assert deltas[-1][0].tolist() == pytest.approx([-0.1503990304, 0.0751995152, -0.0510802815, 0.0953691586],
                                                   abs=1e-9)
    _, _, deltas, _ = run_free_at("delta", 0.1)
    assert deltas[-1][0].tolist() == pytest.approx([0.1509119837, -0.0754559919, 0.051170541, -0.0943511334],
                                                   abs=1e-9)


def test_ema_rule():
    """After a K = 1 batch the EMA weight is decay * a_0 + (1 - decay) * a_1 (the authors' EMA, after every step)."""
    net = ScalarModel()
    ema = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 4, dtype=torch.float64)
    t = torch.tensor([10, 900])
    loss_fn = functools.partial(dpm_at.ddpm_loss, alpha_bar=sampler.alpha_bar_from_beta(sampler.make_beta("cosine")))
    dpm_at.train_step(net, ema, opt, x, lambda _: (x, t, x, 1.0), loss_fn, adv_steps=1, ema_decay=0.9)
    assert ema.a.item() == pytest.approx(0.9 * 0.5 + 0.1 * net.a.item(), rel=1e-12)


def test_loss_identity_eps_and_x0_forms():
    """The eps-form AT loss: the noise taking x0 to x_t + delta is eps' = eps + delta/sqrt(1 - ab), and
    ||eps' - eps_hat||^2 = SNR_t ||x0_hat(x_t + delta) - x0||^2 (docs/method.md §4.1). Checked against a direct
    numpy evaluation of both sides with alpha_bar from the closed form."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    x0, eps = torch.tensor(X0, dtype=torch.float64), torch.tensor(EPS, dtype=torch.float64)
    delta = torch.tensor([[0.05, -0.02, 0.01, 0.03], [0, 0.04, -0.03, 0.02]], dtype=torch.float64)
    eps_hat = torch.tensor([[0.9, -0.4, 0.35, 0.1], [0.1, 0.6, -1.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([499, 499])
    x_t = sampler.q_sample(x0, t, eps, alpha_bar)
    loss = dpm_at.ddpm_loss(lambda x, tt: eps_hat, x0, x_t, t, eps, delta, alpha_bar, "delta")  # per-pixel mean
    ab = cosine_alpha_bar(499)
    e, d, eh = np.array(EPS), delta.numpy(), eps_hat.numpy()
    expected = ((e + d / math.sqrt(1 - ab) - eh) ** 2).sum(1)
    assert (4 * loss).numpy() == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx([0.0500442348, 0.0597853210], rel=1e-8)  # the values of this batch
    x_pert = math.sqrt(ab) * np.array(X0) + math.sqrt(1 - ab) * e + d
    x0_hat = (x_pert - math.sqrt(1 - ab) * eh) / math.sqrt(ab)
    assert expected == pytest.approx(ab / (1 - ab) * ((x0_hat - np.array(X0)) ** 2).sum(1), rel=1e-10)


def test_edm_loss_maps_vp_delta():
    """EDM-form AT with adv_space "vp": a VP perturbation delta enters EDM space as sqrt(1 + sigma^2) delta =
    delta / sqrt(ab) (x_e = x_vp / sqrt(ab), EDM Eq. 7-8 with sigma = sqrt((1 - ab)/ab)), and the loss
    lambda(sigma) ||D - x0||^2 equals the eps-form loss times sigma^2 lambda(sigma) at the same point."""
    x0, eps = torch.tensor(X0, dtype=torch.float64), torch.tensor(EPS, dtype=torch.float64)
    delta = torch.tensor([[0.05, -0.02, 0.01, 0.03], [0, 0.04, -0.03, 0.02]], dtype=torch.float64)
    eps_hat = torch.tensor([[0.9, -0.4, 0.35, 0.1], [0.1, 0.6, -1.0, 0.5]], dtype=torch.float64)
    ab = cosine_alpha_bar(499)
    sigma = torch.full((2,), math.sqrt((1 - ab) / ab), dtype=torch.float64)
    x0_hat = (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps + delta - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
    c_skip, c_out, c_in, _ = (c[:, None] for c in sampler.edm_precond(sigma))

    def F(inp, c_noise):  # makes D(x_e + delta_e) = x0_hat
        return (x0_hat - c_skip * inp / c_in) / c_out

    x_e = x0 + sigma[:, None] * eps
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    edm = dpm_at.edm_loss(F, x0, x_e, sigma, eps, delta, "delta", adv_space="vp")
    eps_form = ((eps + delta / math.sqrt(1 - ab) - eps_hat) ** 2).sum(1)
    assert (4 * edm / (lam * sigma**2)).numpy() == pytest.approx(eps_form.numpy(), rel=1e-10)
    raw = dpm_at.edm_loss(F, x0, x_e, sigma, eps, delta * (1 + sigma[:, None] ** 2).sqrt(), "delta", adv_space="raw")
    assert raw.numpy() == pytest.approx(edm.numpy(), rel=1e-10)


def tiny_net(learn_sigma=False):
    torch.manual_seed(0)
    net = unet.build_unet("tiny", learn_sigma=learn_sigma)
    for p in net.parameters():  # leave ADM's zero init so that the input gradient is non-zero
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    return net, copy.deepcopy(net), torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)


def step_tiny(loss="ddpm", seed=0, batch=4, lr=None, t_state=None, learn_sigma=False, **kw):
    net, ema, opt = tiny_net(learn_sigma)
    if lr is not None:
        opt.param_groups[0]["lr"] = lr
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    noise_fn, loss_fn = dpm_at.make_losses(loss, alpha_bar, torch.Generator().manual_seed(seed), t_state=t_state,
                                           adv_target=kw.pop("adv_target", "delta_detach"))
    before = [p.detach().clone() for p in net.parameters()]
    x0 = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    out = dpm_at.train_step(net, ema, opt, x0, noise_fn, loss_fn, ema_decay=0.99, t_state=t_state, **kw)
    changed = any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    return out, changed, opt.state[next(iter(net.parameters()))]["step"].item()


def test_train_step_tiny_unet():
    """One AT batch on the tiny UNet: finite losses, K = 3 optimizer steps, weights change, and the released step
    makes 0.1 < ||delta|| <= (K - 1) alpha = 0.2, far inside the radius eta sqrt(d) = 5.54 (docs/method.md §4.3)."""
    (clean, adv, delta_norm), changed, opt_steps = step_tiny()
    assert torch.isfinite(clean) and torch.isfinite(adv) and changed and opt_steps == 3
    assert 0.1 < delta_norm.item() <= 0.2 + 1e-6


def test_standard_training_has_no_delta():
    """adv_steps = 0 is plain DDPM training (Ho et al. 2020, Alg. 1): one optimizer step per batch, delta = 0."""
    (_, _, delta_norm), _, opt_steps = step_tiny(adv_steps=0)
    assert delta_norm.item() == 0.0 and opt_steps == 1


def test_adversarial_loss_not_lower():
    """With frozen weights and the exact inner gradient (target `delta`), the inner max does not lower the loss."""
    (clean, adv, _), _, _ = step_tiny(batch=16, seed=1, lr=0.0, adv_target="delta")
    assert adv.item() >= clean.item()


def record_deltas(monkeypatch, name):
    """Wrap dpm_at.<name> (a loss) so that every delta it is called with is recorded; returns the list."""
    seen, real = [], getattr(dpm_at, name)

    def spy(*a, **k):
        seen.append(a[5].detach().clone())
        return real(*a, **k)

    monkeypatch.setattr(dpm_at, name, spy)
    return seen


def test_linf_and_sqrt_d_steps(monkeypatch):
    """--adv-norm linf: sign steps of alpha clamped to [-eta, eta] per coordinate (PGD-linf, Madry et al. 2018), so a
    step longer than eta lands every coordinate on the bound. --adv-step-scale sqrt_d: the l2 step alpha sqrt(d)
    reaches the radius eta sqrt(d) after one ascent step when alpha >= eta (docs/method.md §4.3)."""
    seen = record_deltas(monkeypatch, "ddpm_loss")
    step_tiny(adv_norm="linf", adv_budget=0.01, adv_step_size=0.5, adv_steps=2)
    assert torch.equal(seen[-1].abs(), torch.full_like(seen[-1], 0.01))
    (_, _, delta_norm), _, _ = step_tiny(adv_step_scale="sqrt_d", adv_steps=2)
    assert delta_norm.item() == pytest.approx(0.1 * math.sqrt(3072), rel=1e-5)


def test_dry_run_writes_nothing(tmp_path, capsys):
    """--dry-run prints the resolved config (the cifar10 recipe here) and creates no run folder."""
    dpm_at.main(dpm_at.parse_args(["--dataset", "cifar10", "--dry-run", "--out", str(tmp_path / "r")]))
    assert json.loads(capsys.readouterr().out)["at_start"] == 250_000 and not (tmp_path / "r").exists()


def test_default_first_run_is_silhouettes_at_16(tmp_path, capsys):
    """`python dpm_at.py` alone: the offline silhouettes at 16x16 on the demo UNet, clean until step 3000, grids every
    30 s of wall-clock time, one CPU thread; `--dataset shapes` keeps 32x32."""
    dpm_at.main(dpm_at.parse_args(["--dry-run"]))
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["dataset"], cfg["image_size"], cfg["preset"], cfg["threads"]) == ("silhouettes", 16, "demo", 1)
    assert cfg["at_start"] < cfg["steps"] and cfg["grid_seconds"] == 30 and cfg["out"].endswith("silhouettes_at")
    dpm_at.main(dpm_at.parse_args(["--dry-run", "--dataset", "shapes"]))
    assert json.loads(capsys.readouterr().out)["image_size"] == 32
    assert dpm_at.data_shape("silhouettes", None) == (3, 16, 16) and dpm_at.data_shape("shapes", None) == (3, 32, 32)


def test_grid_cadence():
    """Grids at multiples of grid_every, at the last step, and every grid_seconds; a step grid right after a timed one
    (within grid_every / 4 steps) is skipped; timed grids wait for 4x the last grid's cost when that is longer."""
    args = argparse.Namespace(grid_every=200, grid_seconds=30.0, steps=2000)

    def due(step, last=0, seconds=0.0, cost=0.0):
        return dpm_at.grid_due(step, args, last, seconds, cost)

    assert due(200) and due(400, last=200) and not due(199) and due(1999, seconds=30.0) and due(2000, last=1999)
    assert not due(200, last=195) and not due(200, last=150) and due(200, last=149)  # 200 // 4 = 50 steps apart
    assert not due(77, seconds=29.9) and not due(77, seconds=35.0, cost=10.0) and due(77, seconds=40.0, cost=10.0)
    args.grid_seconds = 0.0  # off (the cifar10 recipe): step grids only
    assert not due(77, seconds=1e6) and due(400) and due(2000, last=1999)


def test_edm_step_projects_onto_the_ball(monkeypatch):
    """An EDM + AT step with a small budget: every delta (VP units) reaches the radius eta sqrt(d) and no further."""
    seen = record_deltas(monkeypatch, "edm_loss")
    (clean, adv, _), changed, _ = step_tiny("edm", adv_budget=0.002, adv_step_size=0.5)
    norms = seen[-1].flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.002 * math.sqrt(3072)), rtol=1e-5)
    assert torch.isfinite(clean) and torch.isfinite(adv) and changed


def test_learned_sigma_and_importance_step():
    """A hybrid-loss AT step with loss-second-moment t-sampling: finite losses; every one of the K = 3 passes feeds
    the t history (as the authors' loop does); importance weights 1/(T p_t) average to 1 under p (IDDPM Sec. 3.3)."""
    T = 1000
    t_state = dict(history=torch.rand(T, 10) + 0.1, count=torch.full((T,), 10))
    (clean, adv, delta_norm), _, _ = step_tiny(t_state=t_state, learn_sigma=True)
    assert torch.isfinite(clean) and torch.isfinite(adv) and delta_norm > 0
    assert t_state["count"].sum().item() == 10 * T + 3 * 4
    # IDDPM Sec. 3.3 written out: p_t ~ sqrt(mean of the squared history), mixed with 0.1% uniform
    p = (t_state["history"].double() ** 2).mean(1).sqrt()
    p = 0.999 * p / p.sum() + 0.001 / T
    t, w = dpm_at.sample_t(t_state, 8, T, torch.Generator().manual_seed(1), "cpu")
    assert torch.allclose(w.double(), 1 / (T * p[t]), rtol=1e-5)


def iddpm_history(history, count, ts, losses):
    """IDDPM's LossSecondMomentResampler update, sample by sample: a full history drops its oldest loss."""
    for t, loss in zip(ts, losses):
        if count[t] == 10:
            history[t] = history[t][1:] + [loss]
        else:
            history[t].append(loss)
            count[t] += 1


@pytest.mark.parametrize("ts", [[3, 5, 3, 3, 7], [2] * 13 + [4], [1, 1]])
def test_t_history_keeps_every_occurrence(ts):
    """update_t_history keeps the same last-10 losses per t as IDDPM's per-sample loop, also when one t occurs
    several times (or more than 10 times) in one batch; the mean of squares the sampler reads is then equal."""
    T = 8
    state = dpm_at.make_t_state(T, "cpu")
    ref_h, ref_c = [[] for _ in range(T)], [0] * T
    g = torch.Generator().manual_seed(0)
    for batch in range(3):
        losses = torch.rand(len(ts), generator=g)
        dpm_at.update_t_history(state, torch.tensor(ts), losses)
        iddpm_history(ref_h, ref_c, ts, losses.tolist())
    for t in range(T):
        n = min(state["count"][t].item(), 10)
        assert sorted(state["history"][t, :n].tolist()) == pytest.approx(sorted(ref_h[t]))


def test_input_perturbation_builds_x_t_from_perturbed_noise():
    """DDPM-IP (Ning et al. 2023, Alg. 1): x_t = sqrt(ab) x0 + sqrt(1 - ab)(eps + gamma xi), the target stays eps."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    x_t, t, eps_out, w = dpm_at.ddpm_noise(x0, torch.Generator().manual_seed(0), alpha_bar, input_perturbation=0.1)
    g = torch.Generator().manual_seed(0)  # the same draws in the same order: t, eps, xi
    t_ref = torch.randint(0, 1000, (6,), generator=g)
    eps, xi = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    ab = alpha_bar[t_ref].float()[:, None]
    assert torch.equal(t, t_ref) and torch.equal(eps_out, eps) and w == 1.0
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * (eps + 0.1 * xi), atol=1e-6)


def test_resolve_paper_schedule():
    """`--dataset cifar10` is the authors' whole schedule: 250K clean steps, then AT to 450K; --init-from starts AT
    at once for the 200K AT batches; explicit flags win."""
    args = dpm_at.resolve_args(dpm_at.parse_args(["--dataset", "cifar10"]))
    settings = (args.steps, args.at_start, args.batch_size, args.lr, args.ema_decay)
    assert settings == (450_000, 250_000, 128, 1e-4, 0.9999)
    assert args.learn_sigma and args.t_sampler == "loss-second-moment" and args.preset == "cifar10"
    args = dpm_at.resolve_args(dpm_at.parse_args(["--dataset", "cifar10", "--init-from", "x.pt"]))
    assert (args.steps, args.at_start) == (200_000, 0)
    args = dpm_at.resolve_args(dpm_at.parse_args(["--dataset", "cifar10", "--at-start", "5", "--steps", "9"]))
    assert (args.steps, args.at_start) == (9, 5)
    args = dpm_at.resolve_args(dpm_at.parse_args(["--dataset", "cifar10", "--loss", "edm", "--no-learn-sigma"]))
    assert (args.learn_sigma, args.t_sampler) == (False, "uniform")  # EDM: neither applies


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dpm_at.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


TINY_RUN = ["--tiny", "--num-shapes", "32", "--batch-size", "2", "--grid-every", "2", "--num-grid", "4",
            "--grid-steps", "2", "--save-every", "2", "--log-every", "1", "--device", "cpu"]


def test_run_resume_equals_straight_run(tmp_path):
    """A 2-step run writes a checkpoint, grids, metrics and args.json; resuming it with only --resume and --steps 3
    takes every other setting from the checkpoint, continues the step counter, the optimizer (K = 3 steps per batch)
    and the RNG, and reaches the weights of a straight 3-step run."""
    out = tmp_path / "run"
    dpm_at.main(dpm_at.parse_args([*TINY_RUN, "--steps", "2", "--out", str(out)]))
    assert (out / "ckpt.pt").exists() and (out / "grid_0000002.png").exists()
    assert json.loads((out / "args.json").read_text())["adv_steps"] == 3
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["loss"] == "ddpm" and ckpt["schedule"] == "cosine"
    assert max(s["step"] for s in ckpt["opt"]["state"].values()) == 6
    dpm_at.main(dpm_at.parse_args(["--steps", "3", "--resume", str(out / "ckpt.pt"), "--device", "cpu"]))
    settings = json.loads((out / "args.json").read_text())
    assert (settings["batch_size"], settings["num_shapes"], settings["ema_decay"], settings["steps"]) == (2, 32, 0.9, 3)
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3 and max(s["step"] for s in resumed["opt"]["state"].values()) == 9
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    dpm_at.main(dpm_at.parse_args([*TINY_RUN, "--steps", "3", "--out", str(tmp_path / "straight")]))
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    for k in straight["model"]:
        assert torch.allclose(straight["model"][k], resumed["model"][k], atol=1e-6), k


def test_at_start_and_checkpoint_settings(tmp_path):
    """--at-start 1: batch 1 is clean (delta 0), batch 2 is AT with a fresh optimizer state (3 steps). An EDM run
    resumed without --loss records loss "edm" in args.json; a flag that contradicts the checkpoint is refused."""
    out = tmp_path / "run"
    dpm_at.main(dpm_at.parse_args([*TINY_RUN, "--loss", "edm", "--at-start", "1", "--steps", "2", "--out", str(out)]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["delta_norm"] == 0 and records[1]["delta_norm"] > 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert max(s["step"] for s in ckpt["opt"]["state"].values()) == 3  # a fresh AdamW state when AT starts
    dpm_at.main(dpm_at.parse_args(["--steps", "3", "--resume", str(out / "ckpt.pt"), "--device", "cpu"]))
    assert json.loads((out / "args.json").read_text())["loss"] == "edm"
    with pytest.raises(dpm_at.UserError, match="contradicts"):
        dpm_at.main(dpm_at.parse_args([*TINY_RUN, "--loss", "ddpm", "--steps", "4", "--resume", str(out / "ckpt.pt")]))


@pytest.mark.parametrize("argv, expect", [
    (["--dataset", "nosuch"], "nosuch"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--init-from", "BAD"], "cannot read checkpoint"),
    (["--steps", "0"], "--steps"),
])
def test_cli_bad_input_one_line(tmp_path, argv, expect):
    """Bad input ends in one `error:` line and exit 1, never a traceback."""
    (tmp_path / "BAD").write_bytes(b"not a checkpoint")
    argv = [a.replace("BAD", str(tmp_path / "BAD")) for a in argv]
    r = cli("--tiny", "--out", str(tmp_path / "r"), *argv)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and expect in lines[-1]
    assert not (tmp_path / "r").exists() and "dpm_at:" not in r.stdout  # refused before the start-up line


def test_cifar10_offline_error(tmp_path, monkeypatch):
    """--dataset cifar10 with no local copy and no network says where to put the tarball and mentions shapes."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(dpm_at.data.DatasetError) as info:
        dpm_at.main(dpm_at.parse_args(["--dataset", "cifar10", "--tiny", "--data-dir", str(tmp_path / "d"),
                                       "--out", str(tmp_path / "r"), "--device", "cpu"]))
    assert "cifar-10-python.tar.gz" in str(info.value) and "shapes" in str(info.value)


def test_existing_run_is_not_overwritten(tmp_path):
    """Starting a fresh run in a directory that holds a checkpoint is refused (nothing is lost)."""
    (tmp_path / "ckpt.pt").write_bytes(b"precious")
    with pytest.raises(dpm_at.UserError, match="--resume"):
        dpm_at.main(dpm_at.parse_args(["--tiny", "--out", str(tmp_path)]))
    assert (tmp_path / "ckpt.pt").read_bytes() == b"precious"


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN at batch 4, between log steps (every 3) but at a save step (every 2), stops training
    before that save: the checkpoint on disk stays the last good one (step 2)."""
    calls = []
    real_loss = dpm_at.ddpm_loss

    def poisoned(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) > 9 else loss  # batches 1-3 fine (3 passes each), then NaN

    monkeypatch.setattr(dpm_at, "ddpm_loss", poisoned)
    args = dpm_at.parse_args([*TINY_RUN, "--steps", "6", "--log-every", "3", "--grid-every", "100",
                              "--out", str(tmp_path)])
    with pytest.raises(dpm_at.UserError, match="not finite"):
        dpm_at.main(args)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_checkpoint_atomic_and_safe_load(tmp_path):
    """save_checkpoint leaves no temp file behind; a checkpoint of another kind is refused on load."""
    path = str(tmp_path / "c.pt")
    dpm_at.save_checkpoint(path, dict(format="adv-diffusion/1", kind="cm", step=1))
    assert os.listdir(tmp_path) == ["c.pt"]
    with pytest.raises(dpm_at.UserError, match="not a dpm_at.py checkpoint"):
        dpm_at.load_checkpoint(path)


def test_gaussian_bins_sum_to_one():
    """The discretized Gaussian decoder likelihood sums to 1 over the 256 pixel bins (DDPM Sec. 3.3)."""
    bins = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1)
    for mean, log_scale in [(0.1, -2.0), (-0.9, -4.0), (0.0, 0.5)]:
        logp = dpm_at.discretized_gaussian_log_likelihood(bins, torch.tensor(mean, dtype=torch.float64),
                                                          torch.tensor(log_scale, dtype=torch.float64))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_vb_term_is_gaussian_kl():
    """For t > 0, L_vb equals KL(q(x_{t-1}|x_t,x0) || p) of torch.distributions, in bits per dim (IDDPM Sec. 3.1)."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    g = torch.Generator().manual_seed(0)
    x0, x_t, eps_hat = (torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.rand(3, 2, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 300, 999])
    got = dpm_at.vb_term(x0, x_t, t, eps_hat, v, alpha_bar)
    beta = sampler.make_beta("cosine")
    c1, c2, bt = sampler.posterior(beta)
    for i, ti in enumerate(t.tolist()):
        ab = alpha_bar[ti]
        x0_hat = (x_t[i] - (1 - ab).sqrt() * eps_hat[i]) / ab.sqrt()
        log_var = (v[i] + 1) / 2 * beta[ti].log() + (1 - v[i]) / 2 * bt[ti].log()
        q = torch.distributions.Normal(c1[ti] * x0[i] + c2[ti] * x_t[i], bt[ti].sqrt())
        p = torch.distributions.Normal(c1[ti] * x0_hat + c2[ti] * x_t[i], (0.5 * log_var).exp())
        expected = torch.distributions.kl_divergence(q, p).mean() / math.log(2)
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ring_run_samples_as_points(tmp_path):
    """dpm_at.py trains the MLP on a 2-D point set (checkpoint arch "mlp", gamma in args, a scatter PNG); bad
    combinations are one-line UserErrors."""
    dpm_at.main(dpm_at.parse_args(["--dataset", "ring", "--tiny", "--steps", "2", "--adv-steps", "0",
                                   "--batch-size", "8", "--input-perturbation", "0.1", "--num-grid", "16",
                                   "--grid-steps", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["net"]["arch"] == "mlp" and ckpt["net"]["in_channels"] == 2
    assert ckpt["args"]["input_perturbation"] == 0.1 and (tmp_path / "run" / "grid_0000002.png").exists()
    for argv, expect in [(["--dataset", "ring", "--preset", "tiny"], "does not fit"),
                         (["--dataset", "shapes", "--preset", "mlp2d"], "does not fit"),
                         (["--loss", "edm", "--input-perturbation", "0.1"], "input-perturbation"),
                         (["--loss", "edm", "--learn-sigma"], "belong to --loss ddpm")]:
        with pytest.raises(dpm_at.UserError, match=expect):
            dpm_at.resolve_args(dpm_at.parse_args(argv))


class EpsV(torch.nn.Module):
    """A learned-variance network [eps_hat, v] with fixed outputs, so that the two loss terms can be told apart."""

    def forward(self, x, t):
        return torch.cat([0.3 * x, torch.full_like(x, 0.2)], 1)


@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_hybrid_loss_weights_vb_by_T_over_1000(T):
    """Hybrid loss = L_simple + (T/1000) L_vb: improved-diffusion's RESCALED_MSE multiplies the vb term by
    num_timesteps / 1000 (gaussian_diffusion.py, training_losses), so the weight is 1 only at T = 1000."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(3, 2, 4, 4, generator=g)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine", T)).float()
    t = torch.tensor([0, T // 2, T - 1])
    x_t = sampler.q_sample(x0, t, eps, alpha_bar)
    loss = dpm_at.ddpm_loss(EpsV(), x0, x_t, t, eps, torch.zeros_like(x_t), alpha_bar)
    simple = (eps - 0.3 * x_t).pow(2).flatten(1).mean(1)  # DDPM Eq. 14 with eps_hat = 0.3 x_t
    vb = dpm_at.vb_term(x0, x_t, t, 0.3 * x_t, torch.full_like(x_t, 0.2), alpha_bar)
    assert torch.allclose(loss, simple + T / 1000 * vb, rtol=1e-5) and (vb > 0).all()


def test_diffusion_steps_and_image_size_reach_the_checkpoint(tmp_path):
    """--diffusion-steps T and --image-size S: the checkpoint records T (read back as 1000 when absent, as in files
    written before the flag), the loss-aware t-sampler keeps T histories, the UNet is built for S."""
    out = tmp_path / "r"
    dpm_at.main(dpm_at.parse_args([*TINY_RUN, "--steps", "1", "--diffusion-steps", "100", "--image-size", "16",
                                   "--t-sampler", "loss-second-moment", "--out", str(out)]))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["diffusion_steps"] == 100 and ckpt["t_state"]["history"].shape == (100, 10)
    assert ckpt["net"]["image_size"] == 16 and ckpt["args"]["image_size"] == 16
    args = dpm_at.parse_args(["--init-from", str(out / "ckpt.pt")])
    dpm_at.adopt_checkpoint(args, ckpt, "ckpt.pt", resume=False)
    assert (args.diffusion_steps, args.image_size) == (100, 16)
    del ckpt["diffusion_steps"]
    args = dpm_at.parse_args(["--init-from", "old.pt"])
    dpm_at.adopt_checkpoint(args, ckpt, "old.pt", resume=False)
    assert args.diffusion_steps == 1000
