"""Consistency distillation with AT (cm_at.py): the boundary scalings, a 1-D Gaussian toy with an exact denoiser,
the CD-AT step, a short distillation, and the cm_at.py CLI with sampler.py reading its checkpoint."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attacks
import cm_at
import data
import sampler
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMA_MIN = 0.002


def tiny_net(image_size=8, out_channels=3, channel_mult=(1, 2), dropout=0.0) -> dict:
    return dict(in_channels=3, out_channels=out_channels, model_channels=16, channel_mult=channel_mult,
                num_res_blocks=1, attention_resolutions=(), num_head_channels=16, dropout=dropout,
                image_size=image_size)


def perturbed_unet(net_config: dict, seed=0, std=0.05) -> unet.UNet:
    """A UNet whose zero-initialised layers are randomised too, so that F and its input gradient are not zero."""
    torch.manual_seed(seed)
    net = unet.UNet(**net_config)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=std) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.01)
    return net


def teacher_ckpt(net: unet.UNet, net_config: dict, loss="edm", **extra) -> dict:
    """The teacher contract of dpm_at.py: the keys cm_at.py reads."""
    return dict(format="adv-diffusion/1", kind="dpm", loss=loss, net=net_config, schedule="cosine",
                model=net.state_dict(), ema=net.state_dict(), step=0, args={}, **extra)


def cd_args(**kw):
    """cm_at.train_step's keyword arguments, with the defaults of its command line (ema_decay: the shapes one)."""
    return dict(dict(adv_steps=3, adv_step_size=0.1, adv_budget=0.1, adv_space="vp", target_decay=0.0,
                     ema_decay=0.99, distance="l2", heun=True), **kw)


# ----------------------------------------------------------------------------------------------------------------
# The boundary scalings and a 1-D Gaussian toy with an exact denoiser


def test_boundary_scalings():
    """The CM boundary scalings (CM App. C) c_skip = sd^2/((s - s_min)^2 + sd^2), c_out = (s - s_min) sd /
    sqrt(s^2 + sd^2), sd = 0.5, s_min = 0.002, evaluated by hand at sigma = 0.002, 0.5, 1, 80; e.g. at sigma = 1:
    0.25/(0.998^2 + 0.25) = 0.2006414105 and 0.998 * 0.5 / sqrt(1.25) = 0.4463191683."""
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out = sampler.cm_scalings(sigma, SIGMA_MIN, 0.5)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_skip[1].item() == pytest.approx(0.502004, rel=1e-6)
    assert c_out[1].item() == pytest.approx(0.352139177, rel=1e-9)
    assert c_skip[2].item() == pytest.approx(0.2006414105, rel=1e-9)
    assert c_out[2].item() == pytest.approx(0.4463191683, rel=1e-9)
    assert c_skip[3].item() == pytest.approx(3.906292723e-05, rel=1e-9)
    assert c_out[3].item() == pytest.approx(0.4999777349, rel=1e-9)


def test_boundary_condition_exact():
    """f(x, sigma_min) = x bit for bit for a random network (CM Sec. 3 boundary condition), in the
    float32 the student trains in, with sigma_min taken from the float64 Karras grid as cm_at.py does."""
    net = perturbed_unet(tiny_net())
    f = sampler.consistency_fn(net, SIGMA_MIN, 0.5)
    x = torch.randn(3, 3, 8, 8) * 5
    sigma_min = sampler.karras_sigmas(18)[:-1][-1].expand(3)  # float64 0.002
    with torch.no_grad():
        assert torch.equal(f(x, sigma_min), x)
        assert not torch.allclose(f(x, torch.full((3,), 0.5)), x)  # the network does act elsewhere


def gaussian_denoiser(x, sigma):
    # exact D(x; sigma) = E[y | y + sigma n = x] = 0.25 x / (0.25 + sigma^2) for data y ~ N(0, 0.5^2)
    return 0.25 * x / (0.25 + sampler.expand(sigma, x) ** 2)


def ideal_consistency_fn(x, sigma):
    # the exact consistency function of the Gaussian toy: the probability-flow ODE keeps x / sqrt(0.25 + sigma^2)
    # constant, so f(x, sigma) = x sqrt((0.25 + s_min^2) / (0.25 + sigma^2)), and f(x, sigma_min) = x
    return x * ((0.25 + SIGMA_MIN**2) / (0.25 + sampler.expand(sigma, x) ** 2)).sqrt()


def t13_inputs():
    sigmas = sampler.karras_sigmas(18)[:-1]
    sigma_hi, sigma_lo = sigmas[8:9], sigmas[9:10]  # i = 8
    x_hi = 0.3 + sampler.expand(sigma_hi, torch.ones(1, 1, dtype=torch.float64))  # y = 0.3, z = 1; (1, 1)
    return x_hi, sigma_hi, sigma_lo


def test_teacher_step_gaussian_toy():
    """The teacher's Heun and Euler steps (CM Alg. 2) from t_8 to t_9 of the N = 18 grid on the Gaussian toy
    (y = 0.3, z = 1), against the two steps evaluated by hand with the exact denoiser above."""
    x_hi, sigma_hi, sigma_lo = t13_inputs()
    assert x_hi.item() == pytest.approx(3.55682152, abs=1e-8)
    heun = cm_at.teacher_step(gaussian_denoiser, x_hi, sigma_hi, sigma_lo, heun=True)
    euler = cm_at.teacher_step(gaussian_denoiser, x_hi, sigma_hi, sigma_lo, heun=False)
    assert heun.item() == pytest.approx(2.152479981, abs=1e-9)
    assert euler.item() == pytest.approx(2.134041387, abs=1e-9)


def test_cd_loss_ideal_f():
    """With the ideal consistency function the CD loss is only the Heun step's error: (f(x_hi) - f(x_lo))^2 with
    f(x_hi) = 0.5397378871, f(x_lo) = 0.5415718083 (the closed-form f above); pseudo-Huber gives
    sqrt(e^2 + c^2) - c, c = 0.00054."""
    x_hi, sigma_hi, sigma_lo = t13_inputs()
    x_lo = cm_at.teacher_step(gaussian_denoiser, x_hi, sigma_hi, sigma_lo)
    assert ideal_consistency_fn(x_hi, sigma_hi).item() == pytest.approx(0.5397378871, abs=1e-9)
    assert ideal_consistency_fn(x_lo, sigma_lo).item() == pytest.approx(0.5415718083, abs=1e-9)
    f = ideal_consistency_fn
    err = 0.5397378871 - 0.5415718083
    l2 = cm_at.cd_loss(f, f, x_hi, torch.zeros_like(x_hi), x_lo, sigma_hi, sigma_lo, "l2")
    assert l2.item() == pytest.approx(err**2, rel=1e-6)
    huber = cm_at.cd_loss(f, f, x_hi, torch.zeros_like(x_hi), x_lo, sigma_hi, sigma_lo, "pseudo_huber")
    assert huber.item() == pytest.approx(math.sqrt(err**2 + 0.00054**2) - 0.00054, rel=1e-6)


def test_two_step_sampler_gaussian_toy(monkeypatch):
    """2-step consistency sampling with tau = (0, 22, 39) on the N = 40 grid and z_1 = 0.3 gives 0.31112339868
    with the ideal f of the Gaussian toy (CM Alg. 1): x0_hat = f(80, 80) = 0.49999423457, re-noised to
    x_mid = x0_hat + 0.3 sqrt(t_22^2 - s_min^2) = 0.91470418752 (t_22 = 1.38236795665), output f(x_mid, t_22)."""
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: torch.full(shape, 0.3, dtype=torch.float64))
    sigmas = sampler.karras_sigmas(40)[:-1]
    out = sampler.consistency_sample(ideal_consistency_fn, torch.ones(1, 1, dtype=torch.float64), sigmas, [0, 22, 39])
    assert out.item() == pytest.approx(0.31112339868, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# One CD-AT batch


def reference_cd_loss(teacher, student, target, x0, i, z, sigmas, sigma_data=0.5):
    """Plain CD loss (CM Alg. 2, Heun teacher step, l2) with EDM Table 1's denoiser and CM App. C's
    parameterisation written out here, with no cm_at.py or sampler.py helpers."""
    def scalings(s):
        s = s.float().view(-1, 1, 1, 1)
        return s, 1 / (s**2 + sigma_data**2).sqrt(), (s.log() / 4).flatten()

    def D(x, s):  # EDM Table 1
        s, c_in, c_noise = scalings(s)
        return sigma_data**2 / (s**2 + sigma_data**2) * x + s * sigma_data * c_in * teacher(c_in * x, c_noise)

    def f(net, x, s):  # CM App. C
        s, c_in, c_noise = scalings(s)
        c_skip = sigma_data**2 / ((s - SIGMA_MIN) ** 2 + sigma_data**2)
        return c_skip * x + (s - SIGMA_MIN) * sigma_data * c_in * net(c_in * x, c_noise)

    s_hi, s_lo = sigmas[i].float().view(-1, 1, 1, 1), sigmas[i + 1].float().view(-1, 1, 1, 1)
    x_hi = x0 + s_hi * z
    d = (x_hi - D(x_hi, sigmas[i])) / s_hi
    x_euler = x_hi + (s_lo - s_hi) * d
    x_lo = x_hi + (s_lo - s_hi) * (d + (x_euler - D(x_euler, sigmas[i + 1])) / s_lo) / 2
    return ((f(student, x_hi, sigmas[i]) - f(target, x_lo, sigmas[i + 1])) ** 2).mean()


def cd_setup(seed=0, dropout=0.0):
    config = tiny_net(dropout=dropout)
    teacher = perturbed_unet(config, seed).eval().requires_grad_(False)
    net_config, state = cm_at.student_from_teacher(teacher_ckpt(teacher, config))
    student = unet.UNet(**net_config)
    student.load_state_dict(state)
    target = copy.deepcopy(student).requires_grad_(False)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.RAdam(student.parameters(), lr=1e-3)
    return teacher, student, target, ema, opt


def test_cd_step_ema_rule_and_clean_loss():
    """One CD batch with K = 1: the clean loss equals the plain CD loss computed independently, the
    student moves, and the target and eval-EMA follow theta- <- mu theta- + (1 - mu) theta exactly (mu = 0.5)."""
    teacher, student, target, ema, opt = cd_setup()
    torch.manual_seed(1)
    for p in target.parameters():  # a target that differs from the student, so the rule is visible
        p.add_(0.01 * torch.randn_like(p))
    student0, target0, ema0 = (copy.deepcopy(m) for m in (student, target, ema))
    sigmas = sampler.karras_sigmas(18)[:-1]
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    args = cd_args(adv_steps=1, target_decay=0.5, ema_decay=0.9)
    clean, last, delta = cm_at.train_step(student, target, ema, opt, sampler.edm_denoiser(teacher), x0, sigmas,
                                          torch.Generator().manual_seed(5), **args)
    g = torch.Generator().manual_seed(5)  # train_step draws i, then z
    i = torch.randint(0, 17, (4,), generator=g)
    z = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        expected = reference_cd_loss(teacher, student0, target0, x0, i, z, sigmas)
    assert clean.item() == pytest.approx(expected.item(), rel=1e-5) and clean.item() > 0
    assert last.item() == clean.item() and delta.item() == 0  # K = 1: one clean pass
    moved = [not torch.equal(a, b) for a, b in zip(student0.parameters(), student.parameters())]
    assert sum(moved) > len(moved) // 2
    for t0, t1, e0, e1, s1 in zip(target0.parameters(), target.parameters(), ema0.parameters(), ema.parameters(),
                                  student.parameters()):
        assert torch.allclose(t1, 0.5 * t0 + 0.5 * s1, rtol=1e-6, atol=1e-7)
        assert torch.allclose(e1, 0.9 * e0 + 0.1 * s1, rtol=1e-6, atol=1e-7)
    assert opt.state[next(iter(student.parameters()))]["step"].item() == 1


def test_gpu_layout_keeps_the_cd_step(monkeypatch):
    """cm_at.gpu_layout's channels_last weights and inputs (the CUDA layout, forced here on CPU) give the plain CD
    loss written out independently, and the same K = 2 update as the default layout."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    sigmas = sampler.karras_sigmas(18)[:-1]
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    runs = []
    for channels_last in (False, True):
        teacher, student, target, ema, opt = cd_setup()
        reference = copy.deepcopy(student)
        x = x0
        if channels_last:
            cm_at.gpu_layout("cuda", teacher, student, target, ema)
            x = x0.contiguous(memory_format=torch.channels_last)
            assert student.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
        clean, last, _ = cm_at.train_step(student, target, ema, opt, sampler.edm_denoiser(teacher), x, sigmas,
                                          torch.Generator().manual_seed(5), **cd_args(adv_steps=2))
        g = torch.Generator().manual_seed(5)  # train_step draws i, then z
        i, z = torch.randint(0, 17, (4,), generator=g), torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            assert clean.item() == pytest.approx(reference_cd_loss(teacher, reference, reference, x0, i, z,
                                                                   sigmas).item(), rel=1e-5)
        runs.append((last, [p.detach().clone() for p in student.parameters()]))
    assert runs[1][0].item() == pytest.approx(runs[0][0].item(), rel=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cd_at_delta_in_vp_ball(monkeypatch):
    """CD-AT (docs/method.md §5.4) with K = 3: delta enters the student's input only, in EDM space as
    sqrt(1 + sigma_hi^2) times a VP delta of norm <= eta sqrt(d) (here it reaches it), the target pass is the clean one
    and is recomputed after every inner step, and K optimizer steps are taken."""
    teacher, student, target, ema, opt = cd_setup()
    calls = []
    real_cd_loss = cm_at.cd_loss

    def recording(f, f_target, x_hi, delta, x_lo, sigma_hi, sigma_lo, distance):
        calls.append(dict(delta=delta.detach().clone(), x_lo=x_lo, sigma_hi=sigma_hi,
                          target=f_target(x_lo, sigma_lo).detach()))
        return real_cd_loss(f, f_target, x_hi, delta, x_lo, sigma_hi, sigma_lo, distance)

    monkeypatch.setattr(cm_at, "cd_loss", recording)
    args = cd_args(adv_steps=3, adv_budget=0.01, adv_step_size=5.0)  # a step longer than the ball: projection binds
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    clean, last, delta = cm_at.train_step(student, target, ema, opt, sampler.edm_denoiser(teacher), x0,
                                          sampler.karras_sigmas(18)[:-1], torch.Generator().manual_seed(2), **args)
    assert len(calls) == 3 and calls[0]["delta"].abs().max() == 0
    radius = 0.01 * math.sqrt(3 * 8 * 8) * (1 + calls[0]["sigma_hi"] ** 2).sqrt().float()  # (B,)
    for c in calls[1:]:
        assert torch.allclose(attacks.per_sample_norm(c["delta"]).flatten(), radius, rtol=1e-5)
    assert torch.equal(calls[1]["x_lo"], calls[2]["x_lo"])  # one teacher step on the clean x_hi
    assert not torch.equal(calls[0]["target"], calls[1]["target"])  # theta- moved (mu = 0: it is the student)
    assert delta.item() == pytest.approx(0.01 * math.sqrt(3 * 8 * 8), rel=1e-5)  # mean ||delta|| in VP units
    assert torch.isfinite(clean) and torch.isfinite(last)
    assert opt.state[next(iter(student.parameters()))]["step"].item() == 3


def test_raw_space_radius():
    """--adv-space raw uses the radius eta sqrt(d) and step alpha as they are, for every sigma."""
    teacher, student, target, ema, opt = cd_setup()
    args = cd_args(adv_steps=2, adv_budget=0.01, adv_step_size=5.0, adv_space="raw")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    _, _, delta_norm = cm_at.train_step(student, target, ema, opt, sampler.edm_denoiser(teacher), x0,
                                        sampler.karras_sigmas(18)[:-1], torch.Generator().manual_seed(3), **args)
    assert delta_norm.item() == pytest.approx(0.01 * math.sqrt(192), rel=1e-5)


def test_dropout_mask_shared_with_target():
    """With dropout and mu = 0, the target pass replays the online pass's dropout masks (CM reference code), so
    at x_lo = x_hi, sigma_lo = sigma_hi the CD loss is exactly 0."""
    _, student, target, _, _ = cd_setup(dropout=0.5)
    student.train()
    target.train()
    f, f_target = sampler.consistency_fn(student), sampler.consistency_fn(target)
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([1.0, 5.0])
    loss = cm_at.cd_loss(f, f_target, x, torch.zeros_like(x), x, sigma, sigma)
    assert loss.abs().max().item() == 0.0


def test_student_from_learned_sigma_teacher():
    """A learned-sigma ddpm teacher ([eps, v], 2C outputs) gives a C-output student with the teacher's EMA weights
    and the first C channels of its output conv; its denoiser returns C channels (IDDPM Sec. 3.1 output layout)."""
    config = tiny_net(out_channels=6)
    teacher = perturbed_unet(config)
    ckpt = teacher_ckpt(teacher, config, loss="ddpm")
    net_config, state = cm_at.student_from_teacher(ckpt, dropout=0.2)
    assert net_config["out_channels"] == 3 and net_config["dropout"] == 0.2 and config["out_channels"] == 6
    student = unet.UNet(**net_config)
    student.load_state_dict(state)
    assert torch.equal(student.out_conv.weight, teacher.out_conv.weight[:3])
    assert torch.equal(student.input_conv.weight, teacher.input_conv.weight)
    denoise = cm_at.load_teacher(ckpt, "cpu")
    assert denoise(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 10.0])).shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------------------------------------------
# A short distillation from a briefly trained teacher, and the CLI


def shapes_x0(n, seed, size=8):
    return torch.from_numpy(data.make_shapes(n, seed, size)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def trained_teacher():
    """A one-level tiny UNet trained for 100 steps with the EDM loss (EDM Table 1) on 8x8 shapes (a few seconds)."""
    config = tiny_net(channel_mult=(1,))
    torch.manual_seed(0)
    net = unet.UNet(**config)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    D = sampler.edm_denoiser(net)
    images, g = shapes_x0(256, 0), torch.Generator().manual_seed(0)
    for _ in range(100):
        y = data.random_batch(images, 16, g)
        # EDM Sec. 5: ln sigma ~ N(-1.2, 1.2^2), weight lambda = (sigma^2 + sd^2) / (sigma sd)^2
        sigma = (torch.randn(16, generator=g) * 1.2 - 1.2).exp()
        n = torch.randn(y.shape, generator=g) * sigma.view(-1, 1, 1, 1)
        weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).view(-1, 1, 1, 1)
        loss = (weight * (D(y + n, sigma) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False), config


def test_distillation_lowers_cd_loss(trained_teacher):
    """200 plain-CD steps (CM Alg. 2) lower the CD loss d(f(x_hi), f(x_lo)) of the student on a held-out batch with
    fixed sigma indices and noise. This shows that the loop optimises its objective on unseen data (not sample
    quality): the student starts as the teacher's denoiser, which is not a consistency function."""
    teacher, config = trained_teacher
    denoise = sampler.edm_denoiser(teacher)
    net_config, state = cm_at.student_from_teacher(teacher_ckpt(teacher, config))
    student = unet.UNet(**net_config)
    student.load_state_dict(state)
    target, ema = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.RAdam(student.parameters(), lr=2e-3)
    sigmas = sampler.karras_sigmas(18)[:-1]
    held = shapes_x0(34, seed=1).float() / 127.5 - 1  # another seed: images the student never sees
    g = torch.Generator().manual_seed(7)
    i = torch.arange(34) % 17  # every grid interval twice
    x_hi = held + sampler.expand(sigmas[i], held) * torch.randn(held.shape, generator=g)
    x_lo = cm_at.teacher_step(denoise, x_hi, sigmas[i], sigmas[i + 1])

    def held_out_loss():
        f = sampler.consistency_fn(student)
        with torch.no_grad():
            return cm_at.cd_loss(f, f, x_hi, 0.0, x_lo, sigmas[i], sigmas[i + 1]).mean().item()

    start = held_out_loss()
    images, args = shapes_x0(256, 0), cd_args(adv_steps=0)
    for _ in range(200):
        cm_at.train_step(student, target, ema, opt, denoise, data.random_batch(images, 8, g), sigmas, g, **args)
    end = held_out_loss()
    assert end < 0.8 * start, (start, end)


def cli(script, *argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_cli_run_sample_resume(tmp_path, trained_teacher):
    """cm_at.py writes a kind-cm checkpoint, args, metrics and 1-/2-step grids; sampler.py samples it with the
    consistency sampler; --resume alone continues at the saved step with the saved optimizer state and settings
    (N = 12 here), and a flag that changes the grid is refused."""
    teacher, config = trained_teacher
    torch.save(teacher_ckpt(teacher, config, sigma_data=0.5), tmp_path / "teacher.pt")
    out = tmp_path / "run"
    common = ["--dataset", "shapes", "--tiny", "--batch-size", "2", "--num-grid", "4", "--grid-every", "2",
              "--save-every", "2", "--log-every", "1", "--adv-steps", "2", "--num-scales", "12"]
    r = cli("cm_at.py", "--teacher", str(tmp_path / "teacher.pt"), *common, "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "cm" and ckpt["loss"] == "cd" and ckpt["step"] == 2 and ckpt["num_scales"] == 12
    assert (ckpt["sigma_min"], ckpt["sigma_max"], ckpt["sigma_data"]) == (0.002, 80.0, 0.5)
    assert ckpt["net"]["out_channels"] == 3 and set(ckpt) >= {"model", "ema", "target", "opt", "rng_cpu", "rng_gen"}
    assert max(s["step"] for s in ckpt["opt"]["state"].values()) == 4  # 2 batches x K = 2 optimizer steps
    for name in ("grid_0000000_1step.png", "grid_0000002_1step.png", "grid_0000002_2step.png", "args.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "args.json").read_text())["teacher"] == str(tmp_path / "teacher.pt")

    r = cli("sampler.py", "--ckpt", str(out / "ckpt.pt"), "--sampler", "consistency", "--steps", "2", "--num", "4",
            "--out", str(out / "s.npz"))
    assert r.returncode == 0, r.stderr
    images = np.load(out / "s.npz")["arr_0"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8

    r = cli("cm_at.py", "--steps", "3", "--resume", str(out / "ckpt.pt"))  # every other setting is saved
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "args.json").read_text())["num_scales"] == 12
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3 and max(s["step"] for s in resumed["opt"]["state"].values()) == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2, 3]
    r = cli("cm_at.py", "--steps", "4", "--num-scales", "18", "--resume", str(out / "ckpt.pt"))
    assert r.returncode == 1 and "contradicts" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case, expect", [
    ("missing", "does not exist"),
    ("corrupt", "cannot read checkpoint"),
    ("cm", "not a dpm_at.py checkpoint"),
    ("unknown_loss", "'vlb'"),
])
def test_cli_bad_teacher_one_line(tmp_path, case, expect):
    """A missing, corrupt, wrong-kind or unknown-loss teacher ends in one `error:` line and exit 1, no traceback."""
    path = tmp_path / "teacher.pt"
    config = tiny_net()
    if case == "corrupt":  # a checkpoint cut short, as by a full disk
        torch.save(teacher_ckpt(unet.UNet(**config), config), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif case == "cm":
        torch.save(dict(format="adv-diffusion/1", kind="cm", loss="cd", net=config), path)
    elif case == "unknown_loss":
        torch.save(teacher_ckpt(unet.UNet(**config), config, loss="vlb"), path)
    r = cli("cm_at.py", "--teacher", str(path), "--tiny", "--out", str(tmp_path / "r"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.stderr


def test_teacher_T_comes_from_its_checkpoint(monkeypatch):
    """A VP teacher with T steps is queried on its own T-step schedule: sigma of its last step maps to label T - 1
    (EDM App. C.3 nearest step); files without diffusion_steps are read as T = 1000."""
    labels = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            labels.append(t.tolist())
            return torch.zeros_like(x)

    monkeypatch.setattr(cm_at.unet, "build_from_config", lambda cfg: Recorder())
    for T, ckpt_T in ((100, {"diffusion_steps": 100}), (1000, {})):
        ckpt = dict(loss="ddpm", schedule="cosine", net={}, ema={}, **ckpt_T)
        teacher = cm_at.load_teacher(ckpt, "cpu")
        alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine", T))
        teacher(torch.zeros(1, 3, 2, 2), sampler.vp_sigma(alpha_bar[T - 1:]))
        assert labels[-1] == [T - 1]
