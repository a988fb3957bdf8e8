"""sampler.py from a checkpoint to images: load_model, generate, fast_sampling and the command line (--seeds, --ts,
--no-clip-denoised, --precision), on small checkpoints made by hand in the format dpm_at.py and cm_at.py write."""
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import torch

import sampler
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the "tiny" UNet preset at 16 x 16: levels 16 and 8, attention at 16


def make_checkpoint(path, kind: str = "dpm", loss: str = "ddpm", learn_sigma: bool = False, noise: float = 0.0,
                    preset: str = "tiny", in_channels: int = 3):
    """A checkpoint dict as dpm_at.py (kind "dpm") or cm_at.py (kind "cm", 18-point grid) saves it. noise = 0 keeps
    ADM's zero-initialised output layer, so the network outputs exactly 0 whatever the batch; noise > 0 adds
    N(0, noise^2) to every weight, so that the network does real work."""
    cfg = unet.preset_config(preset, learn_sigma, None, in_channels, SIZE)
    net = unet.build_from_config(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    state = net.state_dict()
    ckpt = dict(format="adv-diffusion/1", kind=kind, loss=loss, net=cfg, model=state, ema=state, step=0, args={})
    if kind == "dpm":
        ckpt.update(schedule="cosine", sigma_data=0.5)
    else:
        ckpt.update(num_scales=18, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return dict(ddpm=make_checkpoint(d / "ddpm.pt", learn_sigma=True, noise=0.02),
                edm=make_checkpoint(d / "edm.pt", loss="edm", noise=0.02),
                cm=make_checkpoint(d / "cm.pt", kind="cm", loss="cd", noise=0.02),
                ddpm_zero=make_checkpoint(d / "ddpm_zero.pt", learn_sigma=True),
                cm_zero=make_checkpoint(d / "cm_zero.pt", kind="cm", loss="cd"),
                points=make_checkpoint(d / "points.pt", noise=0.02, preset="mlp2d", in_channels=2))


def sample(ckpt: str, out, *argv) -> np.ndarray:
    sampler.main(sampler.parse_args(["--ckpt", ckpt, "--device", "cpu", "--out", str(out), *argv]))
    return np.load(out)["arr_0"]


@pytest.mark.parametrize("loss", ["ddpm", "edm"])
@pytest.mark.parametrize("name", ["ddpm", "es", "ddim", "euler", "heun"])
def test_every_sampler_on_every_loss(ckpts, loss, name):
    """A checkpoint of each loss samples with each sampler: right shape, the stated NFE, values in [-1, 1]."""
    ckpt, net = sampler.load_model(ckpts[loss])
    calls = []
    forward = net.forward
    net.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    z = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    x = sampler.generate(ckpt, net, name, 5, z, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1
    assert len(calls) == sampler.nfe(name, 5)


@pytest.mark.parametrize("name, steps, which", [("ddpm", "4", "ddpm_zero"), ("consistency", "3", "cm_zero")])
def test_seeds_do_not_depend_on_batch_size(ckpts, tmp_path, name, steps, which):
    """--seeds 0-5 gives identical arrays with --batch-size 2 and 4, and --seeds 3-5 gives rows 3-5 of it, for the
    ancestral sampler and 3-step consistency sampling, whose later noise enters every step (EDM generate.py's
    per-seed convention). The checkpoints output exactly 0 (fresh ADM init), so the network's float rounding, which
    may depend on the batch shape, cannot blur the check of the noise."""
    base = [tmp_path / "x.npz", "--sampler", name, "--steps", steps]
    a = sample(ckpts[which], *base, "--seeds", "0-5", "--batch-size", "2")
    b = sample(ckpts[which], *base, "--seeds", "0-5", "--batch-size", "4")
    c = sample(ckpts[which], *base, "--seeds", "3-5", "--batch-size", "4")
    d = sample(ckpts[which], *base, "--seeds", "0,1,2,3-5", "--batch-size", "5")
    assert a.shape == (6, SIZE, SIZE, 3) and np.array_equal(a, b) and np.array_equal(a[3:], c)
    assert np.array_equal(a, d) and np.array_equal(a, sample(ckpts[which], *base, "--num", "6"))
    assert len({row.tobytes() for row in a}) == 6 and 0.02 < a.std() / 255  # distinct, non-constant images


def test_seeds_with_a_real_network(ckpts, tmp_path):
    """With a network that does real work, batch sizes 2 and 4 give the same images up to the network's float
    rounding, which BLAS and cuDNN may vary with the batch shape: a rare uint8 pixel moves by 1 at most."""
    a = sample(ckpts["ddpm"], tmp_path / "x.npz", "--sampler", "ddpm", "--steps", "4", "--seeds", "0-5",
               "--batch-size", "2").astype(int)
    b = sample(ckpts["ddpm"], tmp_path / "x.npz", "--sampler", "ddpm", "--steps", "4", "--seeds", "0-5",
               "--batch-size", "4").astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_ts_and_clip_flags(ckpts, tmp_path):
    """--ts gives the consistency grid indices (NFE = len - 1) and is validated; --no-clip-denoised reaches
    consistency_sample: with a network that pushes f far outside [-1, 1], clamping each estimate changes the result."""
    ckpt, net = sampler.load_model(ckpts["cm"])
    z = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def g():  # the later noise (another seed than z's)
        return torch.Generator().manual_seed(1)

    spread = sampler.generate(ckpt, net, "consistency", 2, z, g())  # evenly spread: (0, 8, 17)
    assert torch.equal(spread, sampler.generate(ckpt, net, "consistency", 99, z, g(), ts=[0, 8, 17]))
    assert not torch.equal(spread, sampler.generate(ckpt, net, "consistency", 2, z, g(), ts=[0, 3, 17]))

    def loud(x_in, c_noise):  # F = 3 c_in x: at sigma = 80, f = 1.5 z, outside [-1, 1] wherever |z| > 2/3
        return 3 * x_in

    clipped = sampler.generate(ckpt, loud, "consistency", 2, z, g())
    assert not torch.equal(clipped, sampler.generate(ckpt, loud, "consistency", 2, z, g(), clip_denoised=False))
    args = sampler.parse_args(["--ckpt", "x", "--no-clip-denoised", "--ts", "0,22,39"])
    assert args.clip_denoised is False and args.ts == "0,22,39" and sampler.parse_args(["--ckpt", "x"]).clip_denoised
    a = sample(ckpts["cm"], tmp_path / "a.npz", "--sampler", "consistency", "--ts", "0,8,17", "--seeds", "0-1")
    b = sample(ckpts["cm"], tmp_path / "b.npz", "--sampler", "consistency", "--steps", "2", "--seeds", "0-1")
    assert np.array_equal(a, b)


def test_consistency_default_is_one_step(ckpts, tmp_path):
    """Without --steps a consistency checkpoint samples in one step (CM Alg. 1), equal to --ts 0,17 on its N = 18
    grid; the diffusion default of 18 points would not fit that grid."""
    one = sample(ckpts["cm"], tmp_path / "a.npz", "--sampler", "consistency", "--num", "2")
    assert np.array_equal(one, sample(ckpts["cm"], tmp_path / "b.npz", "--sampler", "consistency", "--num", "2",
                                      "--ts", "0,17"))


@pytest.mark.parametrize("argv, expect", [
    (["--seeds", "5-3"], "ends below its start"), (["--seeds", "0-99999999999"], "spans"),
    (["--seeds", "a-b"], "expected integers"), (["--seeds", "99999999999999999999"], "below 2\\*\\*63"),
    (["--seeds", "-3"], "expected integers"), (["--seeds", ""], "expected integers"),
    (["--seeds", "0-3,2"], "twice"), (["--seeds", "0-3", "--num", "4"], "not both"), (["--num", "0"], "--num"),
    (["--sampler", "consistency", "--ts", "0,12,9,17"], "increase strictly"),
    (["--sampler", "consistency", "--ts", "1,17"], "from 0 to N - 1 = 17"),
    (["--sampler", "consistency", "--ts", "0,10"], "from 0 to N - 1 = 17"),
    (["--sampler", "consistency", "--ts", "0,18"], "from 0 to N - 1 = 17"),
    (["--sampler", "consistency", "--ts", "0,x"], "expected integers"),
    (["--sampler", "consistency", "--steps", "40"], "at most 17 steps"),
    (["--sampler", "consistency", "--ts", "0,17", "--steps", "1"], "not both"),
])
def test_bad_seeds_and_ts(ckpts, tmp_path, argv, expect):
    """Bad --seeds / --ts values are one-line SamplerErrors naming the problem."""
    with pytest.raises(sampler.SamplerError, match=expect):
        sample(ckpts["cm"], tmp_path / "x.npz", *argv)


def test_sampler_cli(ckpts, tmp_path):
    """The CLI writes a uint8 (N, H, W, 3) npz under arr_0 plus a PNG grid; bad input gives one-line errors; the old
    --seed flag is refused, not read as an abbreviation of --seeds."""
    base = ["--ckpt", ckpts["ddpm"], "--seeds", "0-2", "--batch-size", "2", "--device", "cpu", "--sampler", "ddpm",
            "--steps", "4"]
    sampler.main(sampler.parse_args([*base, "--out", str(tmp_path / "a.npz")]))
    a = np.load(tmp_path / "a.npz")["arr_0"]
    assert a.shape == (3, SIZE, SIZE, 3) and a.dtype == np.uint8 and (tmp_path / "a.png").exists()
    # 16 px images are shown at 2x: 2 x 2 tiles of (2 + 16) px plus 2 px padding, every pixel a 2 x 2 block
    png = np.asarray(Image.open(tmp_path / "a.png"))
    assert png.shape == (2 * (2 * (SIZE + 2) + 2), 2 * (2 * (SIZE + 2) + 2), 3)
    assert np.array_equal(png[4:4 + 2 * SIZE:2, 4:4 + 2 * SIZE:2], a[0])
    assert np.array_equal(png[5:5 + 2 * SIZE:2, 5:5 + 2 * SIZE:2], a[0])
    for argv, expect in [(["--sampler", "nosuch"], "unknown sampler"), (["--steps", "0"], "--steps"),
                         (["--sampler", "consistency"], "does not fit"),
                         (["--out", str(tmp_path / "missing" / "x.npz")], "does not exist")]:
        with pytest.raises(sampler.SamplerError, match=expect):
            sampler.main(sampler.parse_args([*base, *argv]))
    with pytest.raises(sampler.SamplerError, match="--ts gives"):
        sampler.main(sampler.parse_args(["--ckpt", ckpts["ddpm"], "--sampler", "ddpm", "--ts", "0,5"]))
    with pytest.raises(sampler.SamplerError, match="learned sigma"):
        sampler.main(sampler.parse_args(["--ckpt", ckpts["edm"], "--variance", "learned", "--sampler", "ddpm"]))
    with pytest.raises(SystemExit):
        sampler.parse_args(["--ckpt", "x", "--seed", "3"])


def test_points_checkpoint(ckpts, tmp_path):
    """A 2-D point checkpoint (the MLP) samples to float32 (N, 2) points and a scatter PNG."""
    points = sample(ckpts["points"], tmp_path / "p.npz", "--sampler", "heun", "--steps", "3", "--num", "5")
    assert points.shape == (5, 2) and points.dtype == np.float32 and (tmp_path / "p.png").exists()


def test_demo(capsys):
    """`python sampler.py` with no arguments runs the demo: one seed alone reproduces its row of a batch."""
    sampler._demo()
    assert "seed 2 alone gives the same image: True" in capsys.readouterr().out


def test_copied_alone(ckpts, tmp_path):
    """sampler.py and unet.py copied into an empty folder run the command line there with no PYTHONPATH: the same
    npz as in-process, a PNG grid; a bad checkpoint exits 1 with one "error:" line and no traceback."""
    for name in ("sampler.py", "unet.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv):
        return subprocess.run([sys.executable, "sampler.py", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    argv = ["--seeds", "0-3", "--sampler", "ddpm", "--steps", "2", "--device", "cpu"]
    r = run("--ckpt", ckpts["ddpm"], *argv, "--out", "img.npz")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["img.npz", "img.png", "sampler.py", "unet.py"]
    images = np.load(tmp_path / "img.npz")["arr_0"]
    assert images.shape == (4, SIZE, SIZE, 3) and np.array_equal(images, sample(ckpts["ddpm"], tmp_path / "b.npz",
                                                                                 *argv))
    r = run("--ckpt", "img.npz", "--out", "d.npz")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().startswith("error:")


def test_sampling_fast_path(ckpts, tmp_path):
    """fast_sampling leaves the CPU fp32 default untouched (fp32 is the default everywhere); bf16 autocast keeps the
    network's output float32 and within bf16 rounding of fp32 (our tolerance: 3% of the output's RMS), and the CLI
    runs with it."""
    ckpt, net = sampler.load_model(ckpts["ddpm"])
    assert sampler.fast_sampling(net, "cpu") is net
    assert sampler.parse_args(["--ckpt", "x", "--device", "cuda"]).precision == "fp32"
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    ref = net(x, t)
    out = sampler.fast_sampling(net, "cpu", "bf16")(x, t)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)  # bf16 arithmetic did run
    assert (out - ref).pow(2).mean().sqrt() < 0.03 * ref.pow(2).mean().sqrt()
    images = sample(ckpts["ddpm"], tmp_path / "bf16.npz", "--num", "2", "--sampler", "ddim", "--steps", "3",
                    "--precision", "bf16")
    assert images.shape == (2, SIZE, SIZE, 3)
