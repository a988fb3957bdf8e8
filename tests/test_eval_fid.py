"""Tests for eval_fid.py: Fréchet distance, the FID Inception's layout and pooling, weights handling, CLI errors.

CPU only, no downloads: the real Inception weights are never needed. Where the network must run we save a
randomly initialised copy of it, and the CLI reads it through the documented --no-hash-check route.
"""
import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import eval_fid  # noqa: E402

# Key names and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth: torchvision's Inception3 module
# names, which pytorch-fid 0.3.0's FIDInceptionA-E blocks keep, and the kernel sizes of its layers.
PUBLISHED_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_7c.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
    # factorised kernels: orientation as in torchvision's Inception3 (a transposed kernel would not load)
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_7a.branch7x7x3_2.conv.weight": (192, 192, 1, 7),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
}
BRANCHES = {  # torchvision's branch names per block type (torchvision.models.inception, kept by pytorch-fid)
    "A": {"branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"},
    "B": {"branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"},
    "C": {"branch1x1", "branch_pool"} | {f"branch7x7_{i}" for i in range(1, 4)}
         | {f"branch7x7dbl_{i}" for i in range(1, 6)},
    "D": {"branch3x3_1", "branch3x3_2"} | {f"branch7x7x3_{i}" for i in range(1, 5)},
    "E": {"branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"},
}
BLOCK_TYPES = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C", "Mixed_6c": "C",
               "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
TOP_LEVEL = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b",
             "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
             "Mixed_7b", "Mixed_7c", "fc"]


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A state dict saved from a random FIDInceptionV3 (Kaiming init, so features do not vanish over 94 convs)."""
    torch.manual_seed(0)
    model = eval_fid.FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(model.state_dict(), path)
    return path


class PixelFeatures(torch.nn.Module):
    """Cheap stand-in for the Inception: a fixed random map of 4x4-pooled pixels to 2048 features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(48, 2048, generator=torch.Generator().manual_seed(0))
        self.weights_sha256 = "0" * 64

    def forward(self, x):
        x = x.float() / 255
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj


def random_stats(n, d, seed):
    feats = np.random.default_rng(seed).normal(size=(n, d)) * np.linspace(0.5, 2, d)
    return feats.mean(0), np.cov(feats, rowvar=False)


def test_closed_forms():
    """FID of two 2-d Gaussians equals hand-computed values (Heusel et al. 2017 formula).

    Case 1: mu = (0,0) vs (1,0), S1 = I, S2 = diag(4, 1): |dmu|^2 = 1, tr S1 + tr S2 = 2 + 5, (S1 S2)^(1/2) =
    diag(2, 1) with trace 3, so FID = 1 + 7 - 6 = 2. Case 2: mu2 = (1,1), S2 = [[2, .5], [.5, 1]]: |dmu|^2 = 2,
    tr = 2 + 3; S2^(1/2) has trace sqrt(tr S2 + 2 sqrt(det S2)) = sqrt(3 + 2 sqrt(1.75)) = 2.37607897829 (the 2x2
    identity tr(sqrt(A)) = sqrt(tr A + 2 sqrt(det A))), so FID = 2 + 5 - 2 * 2.37607897829 = 2.24784204342."""
    mu1, s1 = np.zeros(2), np.eye(2)
    fid = eval_fid.frechet_distance(mu1, s1, np.array([1.0, 0.0]), np.diag([4.0, 1.0]))
    assert fid == pytest.approx(2.0, abs=1e-12)
    fid = eval_fid.frechet_distance(mu1, s1, np.array([1.0, 1.0]), np.array([[2.0, 0.5], [0.5, 1.0]]))
    assert fid == pytest.approx(2.24784204342, abs=1e-10)


def test_rank_deficient_matches_eigvals_route():
    """20 samples in 64-d (rank-19 covariances): finite, non-negative, equal to an independent float64 route."""
    mu1, s1 = random_stats(20, 64, 1)
    mu2, s2 = random_stats(20, 64, 2)
    fid = eval_fid.frechet_distance(mu1, s1, mu2, s2)
    # torch-fidelity's route: eigenvalues of the non-symmetric S1 S2, real parts clipped at 0
    tr = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert np.isfinite(fid) and fid >= 0
    assert fid == pytest.approx(expected, rel=1e-6)


def test_matches_scipy_sqrtm():
    """On rank-deficient stats our eigen route agrees with pytorch-fid's scipy.linalg.sqrtm formula."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, s1 = random_stats(30, 64, 3)
    mu2, s2 = random_stats(30, 64, 4)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert eval_fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_identical_stats_give_zero():
    """FID of a distribution with itself is ~0 (up to round-off, which may be slightly negative)."""
    mu, s = random_stats(100, 64, 5)
    assert abs(eval_fid.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_nonfinite_trace_retries_with_eps_on_both(monkeypatch):
    """A non-finite tr((S1 S2)^(1/2)) is recomputed with eps*I added to BOTH covariances (pytorch-fid's safeguard)."""
    calls = []
    original = eval_fid.trace_sqrt_product

    def flaky(a, b):
        calls.append((a.copy(), b.copy()))
        return float("nan") if len(calls) == 1 else original(a, b)

    monkeypatch.setattr(eval_fid, "trace_sqrt_product", flaky)
    fid = eval_fid.frechet_distance(np.zeros(2), np.eye(2), np.array([1.0, 0.0]), np.diag([4.0, 1.0]))
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1][0], np.eye(2) + 1e-6 * np.eye(2))
    np.testing.assert_allclose(calls[1][1], np.diag([4.0, 1.0]) + 1e-6 * np.eye(2))
    assert fid == pytest.approx(2.0, abs=1e-5)


def test_shape_mismatch_is_refused():
    """Statistics of different dimensions are refused with a clear error, not broadcast."""
    with pytest.raises(eval_fid.FIDError, match="do not match"):
        eval_fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_state_dict_has_published_layout():
    """The module tree gives pytorch-fid's key names: 566 keys (472 without num_batches_tracked), 23,885,392 values."""
    sd = eval_fid.FIDInceptionV3().state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 566
    plain = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(plain) == 472
    assert sum(v.numel() for v in plain.values()) == 23_885_392
    assert sorted({k.split(".")[0] for k in sd}) == sorted(TOP_LEVEL)
    for block, kind in BLOCK_TYPES.items():
        names = {k.split(".")[1] for k in plain if k.startswith(block + ".")}
        assert names == BRANCHES[kind], block
    suffixes = {k.split(".", 2)[-1] for k in plain if k.startswith("Mixed_")}
    assert suffixes == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert all(m.eps == 0.001 for m in eval_fid.FIDInceptionV3().modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_loads_strictly_and_returns_pool3(random_weights, tmp_path):
    """A saved state dict (566- or 472-key form) loads strictly and 32x32 uint8 images give (N, 2048) features."""
    state = torch.load(random_weights, weights_only=True)
    old_form = tmp_path / "old_form.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old_form)
    models = [eval_fid.load_inception(path, check_hash=False) for path in (random_weights, old_form)]
    for key, value in models[1].state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    assert not models[0].training
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = models[0](images)
        feats_float = models[0](images[:1].float() / 255)  # pytorch-fid's ToTensor: uint8 / 255
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.std() > 0
    torch.testing.assert_close(feats_float, feats[:1], rtol=1e-4, atol=1e-5)
    state["Mixed_5b.branch_pool.conv.weight_renamed"] = state.pop("Mixed_5b.branch_pool.conv.weight")
    torch.save(state, tmp_path / "bad_keys.pth")
    with pytest.raises(eval_fid.FIDError, match="not an FID Inception state dict"):
        eval_fid.load_inception(tmp_path / "bad_keys.pth", check_hash=False)


def window_reference(x, op):
    """3x3 stride-1 pool over the in-bounds part of each window (TF 'SAME' semantics), in numpy."""
    h, w = x.shape
    return np.array([[op(x[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]) for j in range(w)] for i in range(h)])


@pytest.mark.parametrize("block, op", [(b, np.mean) for b in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b",
                                      "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"]] + [("Mixed_7c", np.max)])
def test_pool_branch_semantics(block, op):
    """Pool branches average without counting padding (TF), except Mixed_7c which max-pools (pytorch-fid's
    FIDInceptionE_2, inherited from the TF graph); the expected windows are computed by hand in numpy."""
    module = getattr(eval_fid.FIDInceptionV3(), block).eval()
    conv, bn = module.branch_pool.conv, module.branch_pool.bn
    with torch.no_grad():  # wire branch_pool as the identity on its first channels
        conv.weight.zero_()
        conv.weight[:, :conv.out_channels, 0, 0] = torch.eye(conv.out_channels)
        bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)
    spike = np.zeros((5, 5))
    spike[0, 0], spike[2, 3] = 2.0, 1.0
    for image in (np.full((5, 5), 2.0), spike):
        x = torch.tensor(image, dtype=torch.float32).expand(1, conv.in_channels, 5, 5)
        with torch.no_grad():
            out = module(x)[0, -conv.out_channels:]  # the pool branch is concatenated last
        expected = torch.tensor(window_reference(image, op), dtype=torch.float32).expand_as(out)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_compute_statistics_is_batch_independent():
    """mu is the feature mean and sigma the unbiased (N-1) covariance, for any batch size (float32 round-off aside)."""
    model = PixelFeatures()
    images = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    feats = model(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    centred = feats - feats.mean(0)
    for batch_size in (3, 50):
        mu, sigma = eval_fid.compute_statistics(images, model, batch_size=batch_size)
        assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (2048, 2048)
        np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma, centred.T @ centred / 6, rtol=1e-5, atol=1e-5)


def test_cifar10_reference_is_cached(monkeypatch, tmp_path):
    """`cifar10` reads data.load_cifar10 once; later runs use the cached mu/sigma npz (keyed by the weights hash)."""
    calls = []
    fake_data = types.ModuleType("data")
    fake_data.DatasetError = type("DatasetError", (Exception,), {})

    def load_cifar10(data_dir):
        calls.append(data_dir)
        return np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fake_data.load_cifar10 = load_cifar10
    monkeypatch.setitem(sys.modules, "data", fake_data)
    monkeypatch.setattr(eval_fid, "load_inception", lambda *a, **k: PixelFeatures())
    out = tmp_path / "cifar10_stats.npz"
    argv = ["cifar10", "--save-stats", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    for _ in range(2):
        eval_fid.main(eval_fid.parse_args(argv))
    assert calls == ["./data"]
    assert len(list((tmp_path / "cache").glob("fid_stats_cifar10_train_*.npz"))) == 1
    mu, sigma = eval_fid.compute_statistics(load_cifar10("unused"), PixelFeatures())
    with np.load(out) as saved:
        np.testing.assert_allclose(saved["mu"], mu)
        np.testing.assert_allclose(saved["sigma"], sigma)

    def failing(data_dir):
        raise fake_data.DatasetError("CIFAR-10 not found in ./nowhere")
    fake_data.load_cifar10 = failing
    with pytest.raises(eval_fid.FIDError, match="CIFAR-10 not found"):
        eval_fid.cifar10_statistics(PixelFeatures(), "./nowhere", tmp_path / "other_cache", 50, "cpu")


def test_cached_weights_with_wrong_hash_are_deleted(tmp_path):
    """A cached weights file whose SHA-256 does not start with 6726825d is refused and removed from the cache."""
    cached = tmp_path / eval_fid.WEIGHTS_NAME
    cached.write_bytes(b"not the inception weights")
    with pytest.raises(eval_fid.FIDError, match="SHA-256.*6726825d.*deleted"):
        eval_fid.load_inception(cache_dir=tmp_path)
    assert not cached.exists()


def test_user_weights_with_wrong_hash_are_refused_but_kept(tmp_path):
    """A --weights file with the wrong hash is refused, but the user's file is left in place."""
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"some other network")
    with pytest.raises(eval_fid.FIDError, match="refusing"):
        eval_fid.load_inception(mine)
    assert mine.exists()


def test_download_failure_says_where_to_put_the_file(monkeypatch, tmp_path):
    """Without network the error names the URL and the full path to save the file at, and leaves no partial file."""
    monkeypatch.setattr(eval_fid, "WEIGHTS_URL", "http://127.0.0.1:9/x.pth")
    with pytest.raises(eval_fid.FIDError) as info:
        eval_fid.load_inception(cache_dir=tmp_path)
    assert "http://127.0.0.1:9/x.pth" in str(info.value)
    assert str(tmp_path / eval_fid.WEIGHTS_NAME) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_download_is_announced_checked_and_atomic(monkeypatch, tmp_path, random_weights, capsys):
    """A download is announced on stderr; a wrong hash deletes it; a right hash lands in the cache and loads."""
    monkeypatch.setattr(eval_fid, "WEIGHTS_URL", random_weights.as_uri())  # file:// stands in for the network
    with pytest.raises(eval_fid.FIDError, match="deleted"):
        eval_fid.load_inception(cache_dir=tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []
    assert "downloading" in capsys.readouterr().err
    prefix = hashlib.sha256(random_weights.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(eval_fid, "WEIGHTS_SHA256_PREFIX", prefix)
    model = eval_fid.load_inception(cache_dir=tmp_path / "b")
    assert isinstance(model, eval_fid.FIDInceptionV3) and model.weights_sha256.startswith(prefix)
    assert [p.name for p in (tmp_path / "b").iterdir()] == [eval_fid.WEIGHTS_NAME]


def run_cli(*args, cwd):
    # Never the user's cache. One OpenBLAS thread: on a busy 2-core runner two threads spin against each other
    # and the 2048-d eigendecompositions take 3-4x longer (measured 4 s vs 12-18 s).
    env = dict(os.environ, XDG_CACHE_HOME=str(cwd / "xdg"), OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "eval_fid.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def make_bad_input(kind, tmp_path):
    path = tmp_path / f"{kind}.npz"
    if kind == "no_arr_0":
        np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8))
    elif kind == "float":
        np.savez(path, np.zeros((4, 8, 8, 3), np.float32))
    elif kind == "one_image":
        np.savez(path, np.zeros((1, 8, 8, 3), np.uint8))
    elif kind == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    return path  # "missing": never created


@pytest.mark.parametrize("kind, message", [("no_arr_0", "arr_0"), ("float", "uint8"), ("one_image", "at least 2"),
                                           ("empty_folder", "no images"), ("missing", "no such file")])
def test_cli_bad_input_is_one_error_line(kind, message, tmp_path, capsys):
    """Each bad input ends as exit code 1 with a single `error: ...` line on stderr (in-process, to save a Python
    start per case; an uncaught exception would fail the test, and tests/test_standalone.py runs the real CLI)."""
    good = tmp_path / "good.npz"
    np.savez(good, np.zeros((4, 8, 8, 3), np.uint8))
    argv = [str(make_bad_input(kind, tmp_path)), str(good), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as info:
        eval_fid.main(eval_fid.parse_args(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and not (tmp_path / "cache").exists()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_cli_missing_weights_without_network(monkeypatch, tmp_path, capsys):
    """With no weights and no network, the CLI exits 1 with one error line naming the path to put the file at."""
    monkeypatch.setattr(eval_fid, "WEIGHTS_URL", "http://127.0.0.1:9/x.pth")
    samples = tmp_path / "samples.npz"
    np.savez(samples, np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as info:
        eval_fid.main(eval_fid.parse_args([str(samples), str(samples), "--cache-dir", str(tmp_path / "cache")]))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 1 and len(errors) == 1
    assert str(tmp_path / "cache" / eval_fid.WEIGHTS_NAME) in errors[0]


def test_cli_happy_path(random_weights, tmp_path):
    """Two image sets give a finite positive FID, and one set read as a folder of PNGs or as an npz gives the same
    statistics (so FID ~0 between them); one input with --save-stats computes no FID."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 40, a.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    (tmp_path / "a_png").mkdir()
    for i, image in enumerate(a):
        Image.fromarray(image).save(tmp_path / "a_png" / f"{i:05d}.png")
    common = ["--weights", random_weights, "--no-hash-check", "--device", "cpu", "--batch-size", 2]
    first = run_cli("a_png", "b.npz", "--save-stats", "a_png_stats.npz", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    fid_ab = float(first.stdout.split("FID:")[1])
    second = run_cli("a.npz", "--save-stats", "a_stats.npz", *common, cwd=tmp_path)
    assert second.returncode == 0 and "FID" not in second.stdout, second.stderr
    with np.load(tmp_path / "a_png_stats.npz") as png, np.load(tmp_path / "a_stats.npz") as npz:
        np.testing.assert_array_equal(png["mu"], npz["mu"])
        np.testing.assert_array_equal(png["sigma"], npz["sigma"])
        tolerance = 1e-5 * np.trace(npz["sigma"])
    assert np.isfinite(fid_ab) and fid_ab > 100 * tolerance
