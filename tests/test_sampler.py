"""Schedules, respacing, posterior and samplers against the independent numbers of SPEC §7 (T1-T5, T12)."""
import math
import os

import pytest
import torch

import sampler


def cosine_alpha_bar():
    return sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))


def gaussian_denoiser(x_e, sigma):
    """Exact D(x; sigma) for data y ~ N(0, 0.5^2): E[y | y + sigma n = x] = 0.25 x / (0.25 + sigma^2) (SPEC T12)."""
    return 0.25 * x_e / (0.25 + sampler.expand(sigma, x_e) ** 2)


def test_cosine_schedule_T1():
    """Cosine beta_t and alpha_bar_t (IDDPM Eq. 17, clipped at 0.999) match SPEC T1."""
    beta = sampler.make_beta("cosine")
    alpha_bar = sampler.alpha_bar_from_beta(beta)
    assert beta.dtype == torch.float64 and beta.shape == (1000,)
    table = [(0, 4.1284224822e-05, 0.99995871578), (1, 4.6141752737e-05, 0.99991257593),
             (249, 1.3214966366e-03, 0.84701216133), (499, 3.1458862305e-03, 0.49384359044),
             (749, 7.5457077420e-03, 0.14427210239), (998, 0.74999939290, 2.4287669070e-06),
             (999, 0.999, 2.4287669070e-09)]
    for t, b, ab in table:
        assert beta[t].item() == pytest.approx(b, rel=1e-9)
        assert alpha_bar[t].item() == pytest.approx(ab, rel=1e-9)
    assert alpha_bar[499].sqrt().item() == pytest.approx(0.70274005894, rel=1e-10)
    assert (1 - alpha_bar[499]).sqrt().item() == pytest.approx(0.71144670184, rel=1e-10)


def test_linear_schedule_T2_and_monotone():
    """Linear alpha_bar_t matches SPEC T2, and alpha_bar decreases strictly for both schedules (DDPM Eq. 4)."""
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("linear"))
    for t, ab in [(0, 0.9999), (1, 0.99978009207), (249, 0.52408537383), (499, 0.078587242882),
                  (749, 3.3505504389e-03), (999, 4.0358297654e-05)]:
        assert alpha_bar[t].item() == pytest.approx(ab, rel=1e-9)
    for ab in (alpha_bar, cosine_alpha_bar()):
        assert (ab[1:] < ab[:-1]).all()


def test_unknown_schedule():
    """An unknown schedule name is refused with a message naming the choices."""
    with pytest.raises(ValueError, match="cosine"):
        sampler.make_beta("quadratic")


@pytest.mark.parametrize("spec, expected", [
    ("5", [0, 250, 500, 749, 999]),
    ("8", [0, 143, 285, 428, 571, 714, 856, 999]),
    ("10", list(range(0, 1000, 111))),
    ("20", [0, 53, 105, 158, 210, 263, 315, 368, 421, 473, 526, 578, 631, 684, 736, 789, 841, 894, 946, 999]),
    ("ddim5", [0, 200, 400, 600, 800]),
    ("ddim8", list(range(0, 1000, 125))),
    ("ddim10", list(range(0, 1000, 100))),
    ("ddim20", list(range(0, 1000, 50))),
    ("ddim50", list(range(0, 1000, 20))),
])
def test_respacing_T3(spec, expected):
    """Respaced index sets of the "N" and "ddimN" rules match SPEC T3 (IDDPM Sec. 4, DDIM)."""
    assert sampler.respace(spec) == expected


def test_respaced_beta_T4():
    """Cosine respaced to "10" gives the betas of SPEC T4 and keeps alpha_bar at the kept indices."""
    alpha_bar = cosine_alpha_bar()
    steps = sampler.respace("10")
    beta = sampler.respaced_beta(alpha_bar, steps)
    expected = [4.1284e-05, 0.034373200, 0.092721723, 0.15305105, 0.21933921, 0.29715822, 0.39573557, 0.53252238,
                0.74236817, 0.99999992]
    assert beta.tolist() == pytest.approx(expected, rel=2e-5)
    assert sampler.alpha_bar_from_beta(beta)[-1].item() == pytest.approx(2.4287669e-09, rel=1e-6)
    assert torch.allclose(sampler.alpha_bar_from_beta(beta), alpha_bar[steps], rtol=1e-12)


def test_posterior_T5():
    """Posterior mean coefficients and variance at cosine t = 499 match SPEC T5 (DDPM Eq. 7)."""
    c1, c2, beta_tilde = sampler.posterior(sampler.make_beta("cosine"))
    assert c1[499].item() == pytest.approx(0.0043745882261, rel=1e-9)
    assert c2[499].item() == pytest.approx(0.99535161947, rel=1e-9)
    assert beta_tilde[499].item() == pytest.approx(0.0031361999041, rel=1e-9)


def test_q_sample_moments():
    """x_t from q(x_t | x_0) has mean sqrt(alpha_bar) x_0 and variance 1 - alpha_bar (DDPM Eq. 4)."""
    alpha_bar = cosine_alpha_bar()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    t = torch.full((n,), 499)
    x_t = sampler.q_sample(x0, t, torch.randn(n, 1, generator=g, dtype=torch.float64), alpha_bar)
    assert x_t.mean().item() == pytest.approx(0.70274005894 * 0.8, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - 0.49384359044, abs=5e-3)


@pytest.mark.parametrize("spec, expected", [("10", 0.42105365256), ("ddim10", 0.43355382443),
                                            ("1000", 0.49918929653)])
def test_ddim_gaussian_T12(spec, expected):
    """DDIM (eta = 0, clip on) with the exact Gaussian denoiser from x_T = 1 reaches SPEC T12's end points."""
    alpha_bar = cosine_alpha_bar()
    x_T = torch.ones(1, 1, dtype=torch.float64)
    out = sampler.ddim_sample(gaussian_denoiser, x_T, alpha_bar, sampler.respace(spec))
    assert out.item() == pytest.approx(expected, rel=1e-8)


def test_ancestral_mean_path_T12(monkeypatch):
    """The ancestral sampler with its noise replaced by zeros follows the posterior-mean path of SPEC T12."""
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    out = sampler.ddpm_sample(gaussian_denoiser, torch.ones(1, 1, dtype=torch.float64), cosine_alpha_bar(),
                              sampler.respace("10"))
    assert out.item() == pytest.approx(1.2320630e-05, rel=1e-6)


def test_vp_denoiser_identity():
    """vp_denoiser turns eps_theta into D(x_e; sigma) = x_e - sigma eps_theta(sqrt(ab) x_e, t) at the exact step t."""
    alpha_bar = cosine_alpha_bar()
    seen = {}

    def net(x_t, t):
        seen["t"], seen["x_t"] = t, x_t
        return 0.3 * x_t

    t = torch.tensor([0, 499, 999])
    sigma = sampler.vp_sigma(alpha_bar)[t]
    x_e = torch.randn(3, 2, dtype=torch.float64)
    out = sampler.vp_denoiser(net, alpha_bar)(x_e, sigma)
    ab = alpha_bar[t][:, None]
    assert seen["t"].tolist() == [0.0, 499.0, 999.0]
    assert torch.allclose(seen["x_t"], ab.sqrt() * x_e, rtol=1e-12)
    assert torch.allclose(out, x_e - sigma[:, None] * 0.3 * ab.sqrt() * x_e, rtol=1e-12)


def test_vp_denoiser_nearest_step():
    """Off-grid sigmas get the label of the nearest step in log sigma (EDM App. C.3.4), as a brute-force argmin over
    all T steps finds it; also below the first and above the last step, per row, in one call."""
    alpha_bar = cosine_alpha_bar()
    log_table = sampler.vp_sigma(alpha_bar).log()
    g = torch.Generator().manual_seed(0)
    log_sigma = torch.cat([torch.empty(200, dtype=torch.float64).uniform_(-8.0, 6.0, generator=g),
                           log_table[[0, 10, 999]] - 1.0, log_table[[0, 10, 999]] + 1.0])
    seen = {}

    def net(x_t, t):
        seen["t"] = t
        return torch.zeros_like(x_t)

    sampler.vp_denoiser(net, alpha_bar)(torch.zeros(len(log_sigma), 1, dtype=torch.float64), log_sigma.exp())
    brute = (log_table[None, :] - log_sigma[:, None]).abs().argmin(dim=1)
    assert seen["t"].tolist() == brute.double().tolist()


@pytest.mark.parametrize("which", ["ddpm", "ddim_eta1"])
def test_stochastic_samplers_seeded(which):
    """Stochastic samplers are reproducible under a seeded generator and differ across seeds; outputs in [-1, 1]."""
    alpha_bar = cosine_alpha_bar()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(4, 3, 8, 8, generator=g)
        denoise = sampler.vp_denoiser(lambda x, t: 0.5 * x, alpha_bar)
        if which == "ddpm":
            return sampler.ddpm_sample(denoise, x_T, alpha_bar, sampler.respace("10"), g)
        return sampler.ddim_sample(denoise, x_T, alpha_bar, sampler.respace("10"), g, eta=1.0)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 3, 8, 8)


def test_fixed_small_variance_final_step_is_noise_free():
    """With one step (x at T-1), ancestral returns the clipped x_0 prediction exactly: no noise on the last step."""
    alpha_bar = cosine_alpha_bar()
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = sampler.ddpm_sample(gaussian_denoiser, x_T, alpha_bar, [999], variance="fixed_small")
    ab = alpha_bar[999].item()
    expected = gaussian_denoiser(x_T / math.sqrt(ab), torch.full((2,), math.sqrt((1 - ab) / ab),
                                                                  dtype=torch.float64)).clamp(-1, 1)
    assert torch.allclose(out, expected, rtol=1e-10)


def test_karras_grid_T6():
    """The EDM sigma grid (rho = 7) matches SPEC T6 for N = 18 and N = 40, ending in an exact sigma_min and 0."""
    grid = sampler.karras_sigmas(18)
    expected = [80, 57.586, 40.7856, 28.3746, 19.3525, 12.9101, 8.40094, 5.31519, 3.25682, 1.92334, 1.08817,
                0.585348, 0.296442, 0.139516, 0.0599473, 0.0229345, 0.00752802, 0.002, 0]
    assert grid.tolist() == pytest.approx(expected, rel=1e-5)
    grid40 = sampler.karras_sigmas(40)
    assert grid40[:5].tolist() == pytest.approx([80, 69.4509, 60.1174, 51.8803, 44.6302], rel=1e-5)
    assert grid40[-4:-1].tolist() == pytest.approx([0.00643711, 0.00367659, 0.002], rel=1e-5)
    assert grid40[22].item() == pytest.approx(1.38236795665, rel=1e-10)
    assert grid40[-2].item() == 0.002


def test_edm_preconditioning_T7():
    """c_skip, c_out, c_in, c_noise (EDM Table 1) and lambda(sigma) match SPEC T7; c_skip -> 1, c_out -> 0 as sigma -> 0."""
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = sampler.edm_precond(sigma)
    assert c_skip.tolist() == pytest.approx([0.9999840003, 0.5, 0.2, 3.906097418e-05], rel=1e-9)
    assert c_out.tolist() == pytest.approx([0.001999984, 0.3535533906, 0.4472135955, 0.4999902347], rel=1e-6)
    assert c_in.tolist() == pytest.approx([1.999984, 1.414213562, 0.894427191, 0.01249975587], rel=1e-6)
    assert c_noise.tolist() == pytest.approx([-1.553652025, -0.1732867951, 0, 1.095506659], rel=1e-9, abs=1e-12)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert (lam * c_out**2).tolist() == pytest.approx([1, 1, 1, 1], rel=1e-12)  # unit effective weight on F
    assert lam.tolist() == pytest.approx([250004, 8, 5, 4.00015625], rel=1e-9)
    tiny = sampler.edm_precond(torch.tensor([1e-9], dtype=torch.float64))
    assert tiny[0].item() == pytest.approx(1.0) and tiny[1].item() == pytest.approx(0.0, abs=1e-8)


def test_lognormal_sigma_quantiles_T7():
    """EDM's training sigma, ln sigma ~ N(-1.2, 1.2^2), has the quantiles of SPEC T7 (sampled as in dpm_at.edm_batch)."""
    import dpm_at

    captured = {}
    real = dpm_at.edm_loss

    def spy(net, x, sigma, y, delta, target="delta_detach"):
        captured["sigma"] = sigma
        return torch.zeros(x.shape[0])

    dpm_at.edm_loss = spy
    try:
        loss_of_delta, _, _ = dpm_at.edm_batch(None, torch.zeros(400_000, 1), None,
                                               type("A", (), {"adv_space": "vp", "adv_target": "delta"}),
                                               torch.Generator().manual_seed(0), None)
        loss_of_delta(0.0)
    finally:
        dpm_at.edm_loss = real
    q = torch.quantile(captured["sigma"][:100_000].double(), torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99],
                                                                           dtype=torch.float64))
    assert q.tolist() == pytest.approx([0.0184698, 0.0647086, 0.301194, 1.40195, 4.91169], rel=0.03)


@pytest.mark.parametrize("n, heun_end, euler_end", [(5, 1.2578863077, 0.2336289316), (10, 0.6097980008, 0.3652130651),
                                                     (18, 0.5276246370, 0.4230314364)])
def test_heun_euler_gaussian_T12(n, heun_end, euler_end):
    """EDM Heun and Euler from x = 80 with the exact Gaussian denoiser reach SPEC T12's end points, with NFE 2N-1 / N."""
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)

    x = torch.full((1, 1), 80.0, dtype=torch.float64)
    assert sampler.edm_sample(counted, x, sampler.karras_sigmas(n)).item() == pytest.approx(heun_end, rel=1e-8)
    assert len(calls) == 2 * n - 1 == sampler.nfe("heun", n)
    calls.clear()
    assert sampler.edm_sample(counted, x, sampler.karras_sigmas(n), heun=False).item() == pytest.approx(euler_end,
                                                                                                        rel=1e-8)
    assert len(calls) == n == sampler.nfe("euler", n)


def test_heun_approaches_exact_ode():
    """Heun's error to the exact ODE end point 0.49999023466 (SPEC T12) shrinks as the number of steps grows."""
    x = torch.full((1, 1), 80.0, dtype=torch.float64)
    errors = [abs(sampler.edm_sample(gaussian_denoiser, x, sampler.karras_sigmas(n)).item() - 0.49999023466)
              for n in (10, 18, 40, 100, 400)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-4


def test_edm_churn_is_seeded():
    """S_churn > 0 makes Heun stochastic (EDM Alg. 2), reproducibly under a seed."""
    x = torch.randn(2, 3, dtype=torch.float64) * 80

    def run(seed):
        return sampler.edm_sample(gaussian_denoiser, x, sampler.karras_sigmas(10), generator=torch.Generator().manual_seed(seed),
                                  S_churn=10.0)

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert not torch.equal(run(0), sampler.edm_sample(gaussian_denoiser, x, sampler.karras_sigmas(10)))


def test_cm_boundary_T8_and_two_step_T13(monkeypatch):
    """CM scalings match SPEC T8; with the ideal consistency function, the 2-step sampler on (0, 22, 39) gives T13."""
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out = sampler.cm_scalings(sigma)
    assert c_skip.tolist() == pytest.approx([1, 0.502004, 0.2006414105, 3.906292723e-05], rel=1e-6)
    assert c_out.tolist() == pytest.approx([0, 0.352139177, 0.4463191683, 0.4999777349], rel=1e-8)

    def ideal(x, s):
        return x * ((0.25 + 0.002**2) / (0.25 + sampler.expand(s, x) ** 2)).sqrt()

    monkeypatch.setattr(torch, "randn", lambda shape, **kw: torch.full(shape, 0.3, dtype=kw.get("dtype")))
    out = sampler.consistency_sample(ideal, torch.ones(1, 1, dtype=torch.float64), sampler.karras_sigmas(40)[:-1],
                                     [0, 22, 39])
    assert out.item() == pytest.approx(0.31112339868, rel=1e-9)


def test_eps_scaling_identity():
    """ES divides eps_hat by lambda: D' = x - sigma * eps_hat / lambda (SPEC §1.6), for plain and (x0, v) outputs."""
    x = torch.randn(2, 3, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    eps_hat = (x - gaussian_denoiser(x, sigma)) / sigma[:, None]
    out = sampler.eps_scaled(gaussian_denoiser, 1.017)(x, sigma)
    assert torch.allclose(out, x - sigma[:, None] * eps_hat / 1.017, rtol=1e-12)
    both = sampler.eps_scaled(lambda a, s: (gaussian_denoiser(a, s), "v"), 1.017)(x, sigma)
    assert torch.allclose(both[0], out) and both[1] == "v"


def test_learned_variance_interpolates():
    """With v = +1 the learned ancestral step uses beta' (= fixed_large's noise), with v = -1 beta~' (fixed_small)."""
    alpha_bar = cosine_alpha_bar()
    steps = sampler.respace("5")
    x_T = torch.randn(3, 2, 4, 4, dtype=torch.float64)

    def run(variance, v_value):
        def denoise(x, s):
            out = gaussian_denoiser(x, s)
            return (out, torch.full_like(out, v_value)) if variance == "learned" else out
        return sampler.ddpm_sample(denoise, x_T, alpha_bar, steps, torch.Generator().manual_seed(0), variance)

    beta = sampler.respaced_beta(alpha_bar, steps)
    assert torch.allclose(run("learned", -1.0), run("fixed_small", 0.0), rtol=1e-10)
    # fixed_large differs from v = +1 only in the k = 1 ... K-1 variance: beta' (equal) vs beta~'_1 at k = 0 (unused)
    assert torch.allclose(run("learned", 1.0), run("fixed_large", 0.0), rtol=1e-10)
    assert (beta[1:] > sampler.posterior(beta)[2][1:]).all()


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """One-step dpm_at.py runs (ddpm with learned sigma, and edm) on tiny shapes: real checkpoints of each loss."""
    import dpm_at

    paths = {}
    for loss, extra in [("ddpm", ["--learn-sigma", "--t-sampler", "loss-second-moment"]), ("edm", [])]:
        out = tmp_path_factory.mktemp(loss)
        dpm_at.main(dpm_at.parse_args(["--tiny", "--loss", loss, "--steps", "1", "--batch-size", "2", "--num-shapes",
                                       "8", "--num-grid", "1", "--grid-steps", "1", "--out", str(out), "--device",
                                       "cpu", *extra]))
        paths[loss] = str(out / "ckpt.pt")
    return paths


@pytest.mark.parametrize("loss", ["ddpm", "edm"])
@pytest.mark.parametrize("name", ["ddpm", "es", "ddim", "euler", "heun"])
def test_every_sampler_on_every_loss(tiny_checkpoints, loss, name):
    """A checkpoint of each loss samples with each sampler: right shape, the stated NFE, values in [-1, 1]."""
    ckpt, net = sampler.load_model(tiny_checkpoints[loss])
    calls = []
    forward = net.forward
    net.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    args = sampler.parse_args(["--ckpt", "x"])
    steps = 5
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = sampler.generate(ckpt, net, name, steps, z, torch.Generator().manual_seed(0), args)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1
    assert len(calls) == sampler.nfe(name, steps)


def test_sampler_cli(tiny_checkpoints, tmp_path):
    """The CLI writes a uint8 (N, H, W, 3) npz under arr_0 plus a PNG, identical for identical seeds; bad input gives
    one-line errors."""
    import numpy as np
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(*argv):
        return subprocess.run([sys.executable, os.path.join(root, "sampler.py"), *argv], capture_output=True,
                              text=True, timeout=300)

    base = ["--ckpt", tiny_checkpoints["ddpm"], "--num", "3", "--batch-size", "2", "--device", "cpu"]
    r = run(*base, "--sampler", "ddpm", "--steps", "4", "--out", str(tmp_path / "a.npz"))
    assert r.returncode == 0, r.stderr
    a = np.load(tmp_path / "a.npz")["arr_0"]
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8 and (tmp_path / "a.png").exists()
    sampler.main(sampler.parse_args([*base, "--sampler", "ddpm", "--steps", "4", "--out", str(tmp_path / "b.npz")]))
    assert np.array_equal(a, np.load(tmp_path / "b.npz")["arr_0"])
    for argv, expect in [(["--sampler", "nosuch"], "unknown sampler"), (["--steps", "0"], "--steps"),
                         (["--sampler", "consistency"], "does not fit"),
                         (["--out", str(tmp_path / "missing" / "x.npz")], "does not exist")]:
        with pytest.raises(sampler.SamplerError, match=expect):
            sampler.main(sampler.parse_args([*base, *argv]))
    edm = ["--ckpt", tiny_checkpoints["edm"], "--variance", "learned", "--sampler", "ddpm", "--out",
           str(tmp_path / "c.npz")]
    with pytest.raises(sampler.SamplerError, match="learned sigma"):
        sampler.main(sampler.parse_args(edm))
    r = run("--ckpt", str(tmp_path / "a.npz"), "--out", str(tmp_path / "d.npz"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().startswith("error:")


def test_sampling_fast_path(tiny_checkpoints, tmp_path):
    """fast_sampling leaves the CPU default untouched; bf16 autocast (the CUDA default) keeps the network's output
    float32 and within bf16 rounding of fp32 (our tolerance: 3% of the output's RMS), and the CLI runs with it."""
    import numpy as np

    ckpt, net = sampler.load_model(tiny_checkpoints["ddpm"])
    assert sampler.fast_sampling(net, "cpu") is net
    with torch.no_grad():
        for p in net.parameters():  # a fresh ADM net outputs zeros: give every layer weight
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x, t = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0., 10., 500., 999.])
    ref = net(x, t)
    out = sampler.fast_sampling(net, "cpu", "bf16")(x, t)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)  # bf16 arithmetic did run
    assert (out - ref).pow(2).mean().sqrt() < 0.03 * ref.pow(2).mean().sqrt()
    assert sampler.parse_args(["--ckpt", "x", "--device", "cpu"]).precision == "fp32"
    out_path = str(tmp_path / "bf16.npz")
    sampler.main(sampler.parse_args(["--ckpt", tiny_checkpoints["ddpm"], "--num", "2", "--device", "cpu",
                                     "--sampler", "ddim", "--steps", "3", "--precision", "bf16", "--out", out_path]))
    assert np.load(out_path)["arr_0"].shape == (2, 32, 32, 3)
