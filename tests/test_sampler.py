"""Schedules, respacing, posterior, parameterisations and samplers (sampler.py) against independent numbers.

Reference numbers were computed by us in float64 with separate scripts straight from the papers' formulas (IDDPM
Eq. 17, DDPM Eq. 4/7, EDM Eq. 5 and Table 1, CM App. C), or by hand recursions of each sampler on 1-D Gaussian data
y ~ N(0, 0.5^2), whose exact denoiser is D(x; sigma) = 0.25 x / (0.25 + sigma^2). Where a number has a closed form,
the test computes it itself. The command line (checkpoint -> npz) is tested in test_sampler_cli.py.
"""
import math
import statistics

import pytest
import torch

import sampler

SIGMA_MIN = 0.002


def cosine_alpha_bar():
    return sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))


def gaussian_denoiser(x_e, sigma):
    """Exact D(x; sigma) for data y ~ N(0, 0.5^2): E[y | y + sigma n = x] = 0.25 x / (0.25 + sigma^2)."""
    return 0.25 * x_e / (0.25 + sampler.expand(sigma, x_e) ** 2)


def karras_point(i: int, n: int) -> float:
    """t_i of the n-point Karras grid (EDM Eq. 5, rho = 7, sigma in [0.002, 80]), in plain float arithmetic."""
    return (80 ** (1 / 7) + i / (n - 1) * (SIGMA_MIN ** (1 / 7) - 80 ** (1 / 7))) ** 7


def ideal_f_gain(s: float) -> float:
    """The exact consistency function of the Gaussian toy is f(x, s) = x * g(s), this gain: the probability-flow ODE
    dx/ds = (x - D)/s = x s / (0.25 + s^2) gives x(s) proportional to sqrt(0.25 + s^2), followed down to sigma_min."""
    return math.sqrt((0.25 + SIGMA_MIN**2) / (0.25 + s**2))


def ideal_f(x, sigma):
    """f(x, sigma) = x g(sigma) as a tensor function, per row."""
    return x * ((0.25 + SIGMA_MIN**2) / (0.25 + sampler.expand(sigma, x) ** 2)).sqrt()


def test_cosine_schedule():
    """Cosine beta_t and alpha_bar_t (IDDPM Eq. 17, beta clipped at 0.999) match values computed independently in
    float64 from the closed form f(u) = cos^2((u + 0.008)/1.008 * pi/2)."""
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


def test_linear_schedule_and_monotone():
    """Linear alpha_bar_t (DDPM Sec. 4, beta from 1e-4 to 0.02; products computed independently in float64) matches,
    and alpha_bar decreases strictly for both schedules (DDPM Eq. 4)."""
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
def test_respacing(spec, expected):
    """Respaced index sets (IDDPM Sec. 4: N points at float stride (T-1)/(N-1), each rounded; DDIM: the smallest
    integer stride giving N points), written out by hand from those two rules."""
    assert sampler.respace(spec) == expected


def test_respaced_beta():
    """Cosine respaced to "10": beta'_k = 1 - alpha_bar_{tau_k}/alpha_bar_{tau_{k-1}} (IDDPM Sec. 4) matches values
    computed independently in float64, and the respaced chain keeps alpha_bar at the kept indices."""
    alpha_bar = cosine_alpha_bar()
    steps = sampler.respace("10")
    beta = sampler.respaced_beta(alpha_bar, steps)
    expected = [4.1284e-05, 0.034373200, 0.092721723, 0.15305105, 0.21933921, 0.29715822, 0.39573557, 0.53252238,
                0.74236817, 0.99999992]
    assert beta.tolist() == pytest.approx(expected, rel=2e-5)
    assert sampler.alpha_bar_from_beta(beta)[-1].item() == pytest.approx(2.4287669e-09, rel=1e-6)
    assert torch.allclose(sampler.alpha_bar_from_beta(beta), alpha_bar[steps], rtol=1e-12)


def test_posterior():
    """Posterior mean coefficients and variance at cosine t = 499 (DDPM Eq. 7) match values computed independently
    in float64 from alpha_bar_499, alpha_bar_498 and beta_499."""
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
def test_ddim_gaussian(spec, expected):
    """DDIM (eta = 0, clip on; DDIM Eq. 12) with the exact Gaussian denoiser from x_T = 1 reaches the end points of
    an independent float64 hand recursion of Eq. 12 with eps_hat = sqrt(1 - ab) x / (0.25 ab + 1 - ab)."""
    x_T = torch.ones(1, 1, dtype=torch.float64)
    out = sampler.ddim_sample(gaussian_denoiser, x_T, cosine_alpha_bar(), sampler.respace(spec))
    assert out.item() == pytest.approx(expected, rel=1e-8)


def test_ancestral_mean_path(monkeypatch):
    """With its noise replaced by zeros, the ancestral sampler (DDPM Alg. 2) follows the posterior-mean path of an
    independent float64 hand recursion of DDPM Eq. 7 on respaced "10" from x_T = 1 (end point 1.2320630e-05)."""
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    out = sampler.ddpm_sample(gaussian_denoiser, torch.ones(1, 1, dtype=torch.float64), cosine_alpha_bar(),
                              sampler.respace("10"))
    assert out.item() == pytest.approx(1.2320630e-05, rel=1e-6)


def test_vp_denoiser_identity():
    """vp_denoiser turns eps_theta into D(x_e; sigma) = x_e - sigma eps_theta(sqrt(ab) x_e, t) at the exact step t
    (EDM App. C.3)."""
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


@pytest.mark.parametrize("which", ["ddpm", "ddim_eta1", "heun_churn", "consistency_3step"])
def test_per_row_generators_do_not_depend_on_batch(which):
    """With one generator per row (initial noise and every later noise from it), a row is bit for bit the same
    whether it is sampled in one batch of 6, in batches of 2, or alone; and the later noise does matter."""
    alpha_bar = cosine_alpha_bar()

    def run(seeds, later_offset=0):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        z = sampler.randn((len(seeds), 3, 4, 4), gens, dtype=torch.float64)
        gens = [torch.Generator().manual_seed(s + later_offset) for s in seeds] if later_offset else gens
        if which == "ddpm":
            return sampler.ddpm_sample(gaussian_denoiser, z, alpha_bar, sampler.respace("5"), gens)
        if which == "ddim_eta1":
            return sampler.ddim_sample(gaussian_denoiser, z, alpha_bar, sampler.respace("5"), gens, eta=1.0)
        if which == "heun_churn":
            sigmas = sampler.karras_sigmas(5)
            return sampler.edm_sample(gaussian_denoiser, 80 * z, sigmas, generator=gens, S_churn=10.0)
        return sampler.consistency_sample(ideal_f, z, sampler.karras_sigmas(18)[:-1], [0, 6, 12, 17], gens)

    whole = run(range(6))
    assert torch.equal(whole, torch.cat([run([0, 1]), run([2, 3]), run([4, 5])]))
    assert torch.equal(whole[3:4], run([3]))
    assert not torch.equal(whole, run(range(6), later_offset=100))  # same z, other later noise


def test_fixed_small_variance_final_step_is_noise_free():
    """With one step (x at T-1), ancestral returns the clipped x_0 prediction exactly: no noise on the last step
    (DDPM Alg. 2, line 4)."""
    alpha_bar = cosine_alpha_bar()
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = sampler.ddpm_sample(gaussian_denoiser, x_T, alpha_bar, [999], variance="fixed_small")
    ab = alpha_bar[999].item()
    expected = gaussian_denoiser(x_T / math.sqrt(ab), torch.full((2,), math.sqrt((1 - ab) / ab),
                                                                  dtype=torch.float64)).clamp(-1, 1)
    assert torch.allclose(out, expected, rtol=1e-10)


def test_karras_grid():
    """The EDM sigma grid (EDM Eq. 5, rho = 7) matches the closed form evaluated independently for N = 18 and
    N = 40, ending in an exact sigma_min and then 0."""
    grid = sampler.karras_sigmas(18)
    expected = [80, 57.586, 40.7856, 28.3746, 19.3525, 12.9101, 8.40094, 5.31519, 3.25682, 1.92334, 1.08817,
                0.585348, 0.296442, 0.139516, 0.0599473, 0.0229345, 0.00752802, 0.002, 0]
    assert grid.tolist() == pytest.approx(expected, rel=1e-5)
    grid40 = sampler.karras_sigmas(40)
    assert grid40[:5].tolist() == pytest.approx([80, 69.4509, 60.1174, 51.8803, 44.6302], rel=1e-5)
    assert grid40[-4:-1].tolist() == pytest.approx([0.00643711, 0.00367659, 0.002], rel=1e-5)
    assert grid40[22].item() == pytest.approx(1.38236795665, rel=1e-10)
    assert grid40[22].item() == pytest.approx(karras_point(22, 40), rel=1e-12)
    assert grid40[-2].item() == 0.002


def test_edm_preconditioning():
    """c_skip, c_out, c_in, c_noise (EDM Table 1, sigma_data = 0.5) and the loss weight lambda = (sigma^2 +
    sigma_data^2)/(sigma sigma_data)^2, evaluated independently at sigma = 0.002, 0.5, 1, 80; c_skip -> 1, c_out -> 0
    as sigma -> 0."""
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


def test_lognormal_training_sigma_quantiles():
    """EDM's training sigma drawn by dpm_at.edm_noise, ln sigma ~ N(-1.2, 1.2^2) (EDM Table 1), has the closed-form
    quantiles exp(-1.2 + 1.2 Phi^-1(q)) (0.0184698, 0.0647086, 0.301194, 1.40195, 4.91169 at 1/10/50/90/99 %)."""
    import dpm_at

    _, sigma, _, _ = dpm_at.edm_noise(torch.zeros(100_000, 1), torch.Generator().manual_seed(0))
    qs = [0.01, 0.1, 0.5, 0.9, 0.99]
    q = torch.quantile(sigma.double(), torch.tensor(qs, dtype=torch.float64))
    expected = [math.exp(-1.2 + 1.2 * statistics.NormalDist().inv_cdf(p)) for p in qs]
    assert expected == pytest.approx([0.0184698, 0.0647086, 0.301194, 1.40195, 4.91169], rel=1e-5)
    assert q.tolist() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("n, heun_end, euler_end", [(5, 1.2578863077, 0.2336289316), (10, 0.6097980008, 0.3652130651),
                                                     (18, 0.5276246370, 0.4230314364)])
def test_heun_euler_gaussian(n, heun_end, euler_end):
    """EDM Heun and Euler (EDM Alg. 2) from x = 80 with the exact Gaussian denoiser reach the end points of an
    independent float64 hand recursion of Alg. 2 on the same grid, with NFE 2N-1 / N."""
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
    """Heun's error to the exact ODE end point shrinks as the number of steps grows. For Gaussian data the ODE
    dx/dsigma = x sigma / (0.25 + sigma^2) has x(0) = 80 * 0.5 / sqrt(0.25 + 80^2) = 0.49999023466 (closed form)."""
    exact = 80 * 0.5 / math.sqrt(0.25 + 80**2)
    assert exact == pytest.approx(0.49999023466, rel=1e-10)
    x = torch.full((1, 1), 80.0, dtype=torch.float64)
    errors = [abs(sampler.edm_sample(gaussian_denoiser, x, sampler.karras_sigmas(n)).item() - exact)
              for n in (10, 18, 40, 100, 400)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-4


def test_edm_churn_is_seeded():
    """S_churn > 0 makes Heun stochastic (EDM Alg. 2), reproducibly under a seed."""
    x = torch.randn(2, 3, dtype=torch.float64) * 80

    def run(seed):
        return sampler.edm_sample(gaussian_denoiser, x, sampler.karras_sigmas(10),
                                  generator=torch.Generator().manual_seed(seed), S_churn=10.0)

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert not torch.equal(run(0), sampler.edm_sample(gaussian_denoiser, x, sampler.karras_sigmas(10)))


def test_cm_boundary_scalings():
    """CM boundary scalings (CM App. C, sigma_min = 0.002, sigma_data = 0.5) match the closed form evaluated
    independently: c_skip = 1 and c_out = 0 at sigma_min."""
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out = sampler.cm_scalings(sigma)
    assert c_skip.tolist() == pytest.approx([1, 0.502004, 0.2006414105, 3.906292723e-05], rel=1e-6)
    assert c_out.tolist() == pytest.approx([0, 0.352139177, 0.4463191683, 0.4999777349], rel=1e-8)


def test_two_step_consistency_sampling(monkeypatch):
    """With the ideal consistency function of the Gaussian toy and every noise draw fixed at 0.3, the 2-step sampler
    on the 40-point grid at indices (0, 22, 39) (CM Alg. 1) gives the hand computation x_hat = 80 g(80),
    x_mid = x_hat + 0.3 sqrt(t_22^2 - sigma_min^2), out = x_mid g(t_22) = 0.31112339868. Its estimates stay inside
    [-1, 1], so the per-step clamp leaves it unchanged."""
    t22 = karras_point(22, 40)
    x_hat = 80 * ideal_f_gain(80)
    expected = (x_hat + 0.3 * math.sqrt(t22**2 - SIGMA_MIN**2)) * ideal_f_gain(t22)
    assert expected == pytest.approx(0.31112339868, rel=1e-9)
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: torch.full(shape, 0.3, dtype=kw.get("dtype")))
    for clip in (True, False):
        out = sampler.consistency_sample(ideal_f, torch.ones(1, 1, dtype=torch.float64), sampler.karras_sigmas(40)[:-1],
                                         [0, 22, 39], clip_denoised=clip)
        assert out.item() == pytest.approx(expected, rel=1e-9)


def test_consistency_clamps_each_estimate(monkeypatch):
    """Multistep consistency sampling clamps each x_0 estimate to [-1, 1] before re-noising it (the default
    clip_denoised=True of the CM authors' sampler), and with clip_denoised=False only the output. Hand computation,
    ideal Gaussian-toy f, z = 3, noise 0.3, indices (0, 22, 39) of the 40-point grid: the first estimate
    240 g(80) = 1.49998 leaves [-1, 1]; clamped, x_mid = 1 + 0.3 sqrt(t_22^2 - sigma_min^2) and out = x_mid g(t_22)
    = 0.481193; unclamped, x_mid = 1.49998 + 0.3 sqrt(...) and out = 0.651255. Both end inside [-1, 1], so the final
    clamp alone cannot tell them apart."""
    t22 = karras_point(22, 40)
    first = 240 * ideal_f_gain(80)
    assert first > 1
    clamped = (1 + 0.3 * math.sqrt(t22**2 - SIGMA_MIN**2)) * ideal_f_gain(t22)
    unclamped = (first + 0.3 * math.sqrt(t22**2 - SIGMA_MIN**2)) * ideal_f_gain(t22)
    assert (clamped, unclamped) == pytest.approx((0.4811931275, 0.6512550122), rel=1e-9)
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: torch.full(shape, 0.3, dtype=kw.get("dtype")))
    z = torch.full((1, 1), 3.0, dtype=torch.float64)
    sigmas = sampler.karras_sigmas(40)[:-1]
    assert sampler.consistency_sample(ideal_f, z, sigmas, [0, 22, 39]).item() == pytest.approx(clamped, rel=1e-9)
    out = sampler.consistency_sample(ideal_f, z, sigmas, [0, 22, 39], clip_denoised=False)
    assert out.item() == pytest.approx(unclamped, rel=1e-9)


def test_eps_scaling_identity():
    """ES divides eps_hat by lambda (Ning et al. 2024): D' = x - sigma * eps_hat / lambda, for plain and (x0, v)
    outputs."""
    x = torch.randn(2, 3, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    eps_hat = (x - gaussian_denoiser(x, sigma)) / sigma[:, None]
    out = sampler.eps_scaled(gaussian_denoiser, 1.017)(x, sigma)
    assert torch.allclose(out, x - sigma[:, None] * eps_hat / 1.017, rtol=1e-12)
    both = sampler.eps_scaled(lambda a, s: (gaussian_denoiser(a, s), "v"), 1.017)(x, sigma)
    assert torch.allclose(both[0], out) and both[1] == "v"


def test_learned_variance_interpolates():
    """With v = +1 the learned ancestral step (IDDPM Eq. 15) uses beta' (= fixed_large's noise), with v = -1 beta~'
    (fixed_small)."""
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
