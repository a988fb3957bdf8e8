"""The DDPM AT loss, the free-AT loop (SPEC §3.4, T9), training steps, checkpoints and the dpm_at.py CLI."""
import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import dpm_at
import sampler
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPEC T9 inputs (VP cosine t = 499)
X0 = [[0.5, -0.25, 0.1, 0.8], [-0.6, 0.2, 0.9, -0.1]]
EPS = [[1, -0.5, 0.3, 0], [0.2, 0.7, -1.1, 0.4]]


class ScalarModel(torch.nn.Module):
    """eps_theta(x, t) = a * x, the toy model of SPEC T9."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x, t):
        return self.a * x


def at_args(**kw):
    base = dict(adv_steps=3, adv_step_size=0.1, adv_budget=0.1, adv_norm="l2", adv_step_scale="abs",
                adv_target="delta_detach", ema_decay=0.9999, loss="ddpm", adv_space="vp",
                input_perturbation=0.0)
    return SimpleNamespace(**{**base, **kw})


def run_T9(target, eta):
    """Run the project's free-AT step on the T9 toy and record a after each inner optimizer step."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    x0 = torch.tensor(X0, dtype=torch.float64)
    eps = torch.tensor(EPS, dtype=torch.float64)
    t = torch.tensor([499, 499])
    x_t = sampler.q_sample(x0, t, eps, alpha_bar)
    net = ScalarModel()
    ema = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trace, losses, deltas = [], [], []
    opt.step = (lambda step: lambda *a, **k: (step(*a, **k), trace.append(net.a.item())))(opt.step)

    def loss_of_delta(delta):
        deltas.append(delta.detach().clone())
        loss = dpm_at.ddpm_loss(net, x_t, t, eps, delta, alpha_bar, target)
        losses.append(loss.mean().item())
        return loss

    args = at_args(adv_target=target, adv_budget=eta)
    clean, last, delta_norm = dpm_at.free_at_step(net, ema, opt, loss_of_delta, x_t, args, d=4)
    return trace, losses, deltas, (clean, last, delta_norm)


def test_T9_delta_detach():
    """Free AT with target delta_detach reproduces SPEC T9: a per inner step, losses, and the final delta."""
    trace, losses, deltas, (clean, last, _) = run_T9("delta_detach", 0.1)
    assert trace == pytest.approx([0.5218555234, 0.5359202413, 0.5437927397], abs=1e-9)
    assert losses == pytest.approx([0.2218852794, 0.1800495487, 0.1455837206], abs=1e-9)
    assert deltas[-1][0].tolist() == pytest.approx([-0.1503990304, 0.0751995152, -0.0510802815, 0.0953691586],
                                                   abs=1e-9)
    assert deltas[0].abs().max() == 0  # pass 0 uses the clean x_t
    assert clean.item() == pytest.approx(losses[0]) and last.item() == pytest.approx(losses[-1])


def test_T9_projection_active():
    """With eta = 0.03 (r = 0.06) the projection binds and T9's a-trace and delta are reproduced."""
    trace, _, deltas, _ = run_T9("delta_detach", 0.03)
    assert trace == pytest.approx([0.5218555234, 0.5384141162, 0.5540908161], abs=1e-9)
    assert deltas[-1][0].tolist() == pytest.approx([-0.0450330548, 0.0225165274, -0.0153111725, 0.0288200965],
                                                   abs=1e-9)
    assert (deltas[-1].norm(dim=1) <= 0.06 + 1e-12).all()


def test_T9_delta_target():
    """Target `delta` (exact inner-max gradient) reproduces T9, with delta opposite in sign to delta_detach."""
    trace, _, deltas, _ = run_T9("delta", 0.1)
    assert trace == pytest.approx([0.5218555234, 0.5498035858, 0.5839040102], abs=1e-9)
    assert deltas[-1][0].tolist() == pytest.approx([0.1509119837, -0.0754559919, 0.051170541, -0.0943511334],
                                                   abs=1e-9)


def test_T9_original_target():
    """Target `original` (eps unshifted) reproduces the a-trace of T9."""
    trace, _, _, _ = run_T9("original", 0.1)
    assert trace == pytest.approx([0.5218555234, 0.5392116981, 0.5519091596], abs=1e-9)


def test_ema_rule():
    """After one free-AT batch with K = 1 the EMA weight is decay * a_0 + (1 - decay) * a_1 (SPEC §1.7)."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    net = ScalarModel()
    ema = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 4, dtype=torch.float64)
    t = torch.tensor([10, 900])
    dpm_at.free_at_step(net, ema, opt, lambda d: dpm_at.ddpm_loss(net, x, t, x, d, alpha_bar), x,
                        at_args(adv_steps=1, ema_decay=0.9), d=4)
    assert ema.a.item() == pytest.approx(0.9 * 0.5 + 0.1 * net.a.item(), rel=1e-12)


def test_loss_identity_T10():
    """The eps-form AT loss equals SNR_t times the x_0-form loss, with the values of SPEC T10."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    x0 = torch.tensor(X0, dtype=torch.float64)
    eps = torch.tensor(EPS, dtype=torch.float64)
    delta = torch.tensor([[0.05, -0.02, 0.01, 0.03], [0, 0.04, -0.03, 0.02]], dtype=torch.float64)
    eps_hat = torch.tensor([[0.9, -0.4, 0.35, 0.1], [0.1, 0.6, -1.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([499, 499])
    x_t = sampler.q_sample(x0, t, eps, alpha_bar)
    loss = dpm_at.ddpm_loss(lambda x, tt: eps_hat, x_t, t, eps, delta, alpha_bar)  # per-pixel mean
    assert (4 * loss).tolist() == pytest.approx([0.0500442348, 0.0597853210], rel=1e-8)
    ab = alpha_bar[499]
    x0_hat = (x_t + delta - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    snr = ab / (1 - ab)
    assert snr.item() == pytest.approx(0.97567388482, rel=1e-10)
    assert torch.allclose(4 * loss, snr * ((x0_hat - x0) ** 2).sum(1), rtol=1e-10)


def tiny_setup(adv_steps=3):
    torch.manual_seed(0)
    net = unet.build_unet("tiny")
    for p in net.parameters():  # leave ADM's zero init so that the input gradient is non-zero
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    ema = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    args = at_args(adv_steps=adv_steps, ema_decay=0.99)
    return net, ema, opt, alpha_bar, args


def test_train_step_tiny_unet():
    """One AT batch on the tiny UNet gives finite losses, a delta on the l2 ball's scale, and changes weights."""
    net, ema, opt, alpha_bar, args = tiny_setup()
    before = [p.detach().clone() for p in net.parameters()]
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    clean, adv, delta_norm = dpm_at.train_step(net, ema, opt, x0, alpha_bar, args, g)
    assert torch.isfinite(clean) and torch.isfinite(adv)
    # two ascent steps of length alpha = 0.1 from 0 (same direction at most): 0 < ||delta|| <= 0.2 << r = 5.54
    assert 0.1 < delta_norm.item() <= 0.2 + 1e-6
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert opt.state[next(iter(net.parameters()))]["step"].item() == 3  # K optimizer steps per batch


def test_standard_training_has_no_delta():
    """--adv-steps 0 is plain DDPM training: one optimizer step per batch and delta = 0."""
    net, ema, opt, alpha_bar, args = tiny_setup(adv_steps=0)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    _, _, delta_norm = dpm_at.train_step(net, ema, opt, x0, alpha_bar, args, torch.Generator().manual_seed(0))
    assert delta_norm.item() == 0.0
    assert opt.state[next(iter(net.parameters()))]["step"].item() == 1


def test_adversarial_loss_not_lower():
    """On average over a batch, the inner max does not lower the loss: adv loss >= clean loss at fixed weights."""
    net, ema, opt, alpha_bar, args = tiny_setup()
    opt.param_groups[0]["lr"] = 0.0  # freeze weights so that only delta moves between the passes
    x0 = torch.rand(16, 3, 32, 32) * 2 - 1
    args.adv_target = "delta"  # the exact gradient of the inner objective
    clean, adv, _ = dpm_at.train_step(net, ema, opt, x0, alpha_bar, args, torch.Generator().manual_seed(1))
    assert adv.item() >= clean.item()


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dpm_at.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_shapes_run_and_resume(tmp_path):
    """A few-step shapes run writes a checkpoint, grids and metrics; resuming continues at the saved step with
    the saved optimizer state, and reaches the same weights as one uninterrupted run (same seed)."""
    out = tmp_path / "run"
    common = ["--dataset", "shapes", "--tiny", "--num-shapes", "64", "--batch-size", "2", "--grid-every", "2",
              "--num-grid", "4", "--grid-steps", "2", "--save-every", "2", "--log-every", "1"]
    r = cli(*common, "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "ckpt.pt").exists() and (out / "grid_0000002.png").exists()
    assert json.loads((out / "args.json").read_text())["adv_steps"] == 3
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["loss"] == "ddpm" and ckpt["schedule"] == "cosine"
    assert max(s["step"] for s in ckpt["opt"]["state"].values()) == 6  # 2 batches x K = 3 optimizer steps

    r = cli(*common, "--steps", "3", "--resume", str(out / "ckpt.pt"))
    assert r.returncode == 0, r.stderr
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3
    assert max(s["step"] for s in resumed["opt"]["state"].values()) == 9
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]

    r = cli(*common, "--steps", "3", "--out", str(tmp_path / "straight"))
    assert r.returncode == 0, r.stderr
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    for k in straight["model"]:
        assert torch.allclose(straight["model"][k], resumed["model"][k], atol=1e-6), k


@pytest.mark.parametrize("argv, expect", [
    (["--dataset", "nosuch"], "nosuch"),
    (["--dataset", "folder:/nonexistent/dir"], "/nonexistent/dir"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--init-from", "BAD"], "cannot read checkpoint"),
    (["--steps", "0"], "--steps"),
])
def test_cli_bad_input_one_line(tmp_path, argv, expect):
    """Bad input ends in one `error:` line and exit 1, never a traceback."""
    (tmp_path / "BAD").write_bytes(b"not a checkpoint")
    argv = [a.replace("BAD", str(tmp_path / "BAD")) for a in argv]
    r = cli("--tiny", "--out", str(tmp_path / "r"), *argv)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and expect in lines[-1]


def test_cifar10_offline_error(tmp_path, monkeypatch):
    """--dataset cifar10 with no local copy and no network says where to put the tarball and mentions shapes."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dpm_at.py"), "--dataset", "cifar10", "--tiny",
                        "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cifar-10-python.tar.gz" in r.stderr and "shapes" in r.stderr


def test_existing_run_is_not_overwritten(tmp_path):
    """Starting a fresh run in a directory that holds a checkpoint is refused (nothing is lost)."""
    (tmp_path / "ckpt.pt").write_bytes(b"precious")
    r = cli("--tiny", "--out", str(tmp_path))
    assert r.returncode == 1 and "--resume" in r.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == b"precious"


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN stops training with a message and leaves the last good checkpoint untouched."""
    calls = []
    real_loss = dpm_at.ddpm_loss

    def poisoned(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) > 6 else loss  # batches 1-2 fine (3 passes each), then NaN

    monkeypatch.setattr(dpm_at, "ddpm_loss", poisoned)
    args = dpm_at.parse_args(["--tiny", "--num-shapes", "32", "--batch-size", "2", "--steps", "6",
                              "--save-every", "2", "--log-every", "100", "--grid-every", "100",
                              "--out", str(tmp_path), "--device", "cpu"])
    with pytest.raises(dpm_at.UserError, match="not finite"):
        dpm_at.main(args)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_checkpoint_atomic_and_safe_load(tmp_path):
    """save_checkpoint leaves no temp file behind; a checkpoint of another kind is refused on load."""
    path = str(tmp_path / "c.pt")
    dpm_at.save_checkpoint(path, dict(format="adv-diffusion/1", kind="cm", step=1))
    assert os.listdir(tmp_path) == ["c.pt"]
    with pytest.raises(dpm_at.UserError, match="not a dpm_at.py checkpoint"):
        dpm_at.load_checkpoint(path)


def test_edm_form_identity_T10():
    """EDM-form loss lambda(sigma)||D - y||^2 equals the eps-form loss times sigma^2 lambda(sigma) (SPEC §2.2, T10)."""
    x0 = torch.tensor(X0, dtype=torch.float64)
    eps = torch.tensor(EPS, dtype=torch.float64)
    delta = torch.tensor([[0.05, -0.02, 0.01, 0.03], [0, 0.04, -0.03, 0.02]], dtype=torch.float64)
    eps_hat = torch.tensor([[0.9, -0.4, 0.35, 0.1], [0.1, 0.6, -1.0, 0.5]], dtype=torch.float64)
    sqrt_ab, sqrt_1m = 0.70274005894, 0.71144670184
    sigma = torch.tensor([1.01238956395] * 2, dtype=torch.float64)
    assert sqrt_1m / sqrt_ab == pytest.approx(sigma[0].item(), rel=1e-10)
    # the same point in EDM space: x_e + delta_e = (x_t + delta)/sqrt(ab), and D = x0_hat of that point
    x_e = x0 + sigma[:, None] * eps
    delta_e = delta / sqrt_ab
    x0_hat = (sqrt_ab * x0 + sqrt_1m * eps + delta - sqrt_1m * eps_hat) / sqrt_ab
    c_skip, c_out, c_in, _ = (c[:, None] for c in sampler.edm_precond(sigma))

    def F(inp, c_noise):  # the network output that makes D(x_e + delta_e) = x0_hat
        return (x0_hat - c_skip * inp / c_in) / c_out

    # `delta` target (exact, y unchanged): the eps-form with target eps + delta/sqrt(1 - ab) has the same value
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    edm = dpm_at.edm_loss(F, x_e, sigma, x0, delta_e, "delta")
    assert (4 * edm / (lam * sigma**2)).tolist() == pytest.approx([0.0500442348, 0.0597853210], rel=1e-8)


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


def test_learned_sigma_and_importance_step():
    """A learned-variance (hybrid loss) AT step with loss-second-moment t-sampling gives finite losses, fills the
    t history, and its importance weights average to 1 under p (unbiased: E_p[1/(T p_t)] = 1)."""
    torch.manual_seed(0)
    net = unet.build_unet("tiny", learn_sigma=True)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    ema = copy.deepcopy(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    T = 1000
    t_state = dict(history=torch.rand(T, 10) + 0.1, count=torch.full((T,), 10))
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    clean, adv, delta_norm = dpm_at.train_step(net, ema, opt, x0, alpha_bar, at_args(), g, t_state)
    assert torch.isfinite(clean) and torch.isfinite(adv) and delta_norm > 0
    assert t_state["count"].sum().item() == 10 * T + 4  # one clean-pass loss per sample, not one per inner pass
    p = (t_state["history"] ** 2).mean(1).sqrt()
    p = 0.999 * p / p.sum() + 0.001 / T
    _, w = dpm_at.sample_t(t_state, 8, T, torch.Generator().manual_seed(1), "cpu")
    assert (p * (1 / (T * p))).sum().item() == pytest.approx(1.0)
    assert torch.isfinite(w).all() and (w > 0).all()


def test_edm_at_step_in_mapped_ball():
    """One EDM + AT step on the tiny UNet keeps every delta inside its sigma-mapped ball (SPEC §3.6) and changes
    the weights; with --adv-space raw the same budget is not scaled."""
    net, ema, opt, alpha_bar, args = tiny_setup()
    args.loss, args.adv_budget, args.adv_step_size = "edm", 0.002, 0.5  # small ball so that projection binds
    seen = []
    real = dpm_at.edm_loss

    def spy(net_, x, sigma, y, delta, target="delta_detach"):
        seen.append((sigma, delta.detach().clone()))
        return real(net_, x, sigma, y, delta, target)

    dpm_at.edm_loss, before = spy, [p.detach().clone() for p in net.parameters()]
    try:
        x0 = torch.rand(4, 3, 32, 32) * 2 - 1
        clean, adv, _ = dpm_at.train_step(net, ema, opt, x0, alpha_bar, args, torch.Generator().manual_seed(0))
    finally:
        dpm_at.edm_loss = real
    sigma, delta = seen[-1]
    radius = 0.002 * math.sqrt(3 * 32 * 32) * (1 + sigma**2).sqrt()
    norms = delta.flatten(1).norm(dim=1)
    assert (norms <= radius * (1 + 1e-5)).all() and torch.allclose(norms, radius, rtol=1e-4)
    assert torch.isfinite(clean) and torch.isfinite(adv)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_input_perturbation_builds_x_t_from_perturbed_noise():
    """DDPM-IP (Ning et al. 2023, Alg. 1): x_t = sqrt(ab) x0 + sqrt(1 - ab)(eps + gamma xi), the target stays eps."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    seen = []

    def net(x, t):  # predicts eps = 0, so the loss is mean(target^2)
        seen.append(x)
        return torch.zeros_like(x)

    loss_of_delta, x_t, _ = dpm_at.ddpm_batch(net, x0, alpha_bar, at_args(input_perturbation=0.1),
                                              torch.Generator().manual_seed(0), None)
    g = torch.Generator().manual_seed(0)  # the same draws in the same order: t, eps, xi
    t = torch.randint(0, 1000, (6,), generator=g)
    eps, xi = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    ab = alpha_bar[t].float()[:, None]
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * (eps + 0.1 * xi), atol=1e-6)
    assert torch.allclose(loss_of_delta(torch.zeros_like(x_t)), eps.pow(2).mean(1), atol=1e-6)
    assert torch.equal(seen[0], x_t)


def test_ring_run_records_ip_and_samples_as_points(tmp_path):
    """dpm_at.py trains the MLP on a 2-D point set (checkpoint arch "mlp", gamma in args, a scatter PNG), and
    sampler.py rebuilds it and writes float (N, 2) points; bad combinations are one-line UserErrors."""
    args = dpm_at.parse_args(["--dataset", "ring", "--tiny", "--steps", "2", "--adv-steps", "0", "--batch-size", "8",
                              "--input-perturbation", "0.1", "--num-grid", "16", "--grid-steps", "2", "--out",
                              str(tmp_path / "run"), "--device", "cpu"])
    dpm_at.main(args)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["net"]["arch"] == "mlp" and ckpt["net"]["in_channels"] == 2
    assert ckpt["args"]["input_perturbation"] == 0.1
    assert (tmp_path / "run" / "grid_0000002.png").exists()
    sampler.main(sampler.parse_args(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--sampler", "heun", "--steps", "3",
                                     "--num", "5", "--out", str(tmp_path / "s.npz"), "--device", "cpu"]))
    import numpy as np

    points = np.load(tmp_path / "s.npz")["arr_0"]
    assert points.shape == (5, 2) and points.dtype == np.float32 and (tmp_path / "s.png").exists()
    for argv, expect in [(["--dataset", "ring", "--preset", "tiny"], "does not fit"),
                         (["--dataset", "shapes", "--preset", "mlp2d"], "does not fit"),
                         (["--loss", "edm", "--input-perturbation", "0.1"], "input-perturbation")]:
        with pytest.raises(dpm_at.UserError, match=expect):
            dpm_at.resolve_args(dpm_at.parse_args(argv))
