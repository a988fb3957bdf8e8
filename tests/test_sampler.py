"""Schedules, respacing, posterior and samplers against the independent numbers of SPEC §7 (T1-T5, T12)."""
import math

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
