"""Checks of experiments/claim_images.py: the feature distance, the t-interval, the shared start and batches of the
arms, the pre-registered rule, the labels of `shapes`, and the --quick run end to end."""
import hashlib
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import claim_images  # noqa: E402
import data  # noqa: E402


@pytest.fixture(scope="module")
def feature_net():
    torch.set_num_threads(1)
    return claim_images.train_feature_net(steps=20, n_train=500, n_test=100)[0]


def test_feature_distance_is_zero_for_identical_sets_and_grows_with_blur_and_noise(feature_net):
    """The Frechet distance (Heusel et al. 2017) of a set to itself is 0, and it grows monotonically as the same images
    are blurred or noised more strongly."""
    x = claim_images.as_x0(data.make_shapes(300, seed=7))
    stats = claim_images.feature_stats(feature_net, x)
    assert claim_images.feature_distance(feature_net, x, stats) == pytest.approx(0.0, abs=1e-6 * np.trace(stats[1]))
    for degrade, strengths in ((claim_images.blur, (0.5, 1.0, 2.0)), (claim_images.add_noise, (0.1, 0.2, 0.4))):
        distances = [claim_images.feature_distance(feature_net, degrade(x, s), stats) for s in strengths]
        # the smallest degradation already lies 10x beyond the round-off bound of the identical-set check
        assert 1e-5 * np.trace(stats[1]) < distances[0] < distances[1] < distances[2], (degrade.__name__, distances)


def test_blur_keeps_a_constant_image_and_the_mean():
    """A normalised Gaussian kernel with reflect padding maps a constant image to itself; a centred impulse keeps its
    sum (the kernel lies inside the image) and spreads symmetrically with its peak at the centre."""
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(claim_images.blur(flat, 1.5), flat, atol=1e-6)
    impulse = torch.zeros(1, 3, 32, 32)
    impulse[..., 16, 16] = 1.0
    out = claim_images.blur(impulse, 1.0)
    assert out.sum().item() == pytest.approx(3.0, rel=1e-5)
    assert out[0, 0, 16, 16] == out[0, 0].max() and out[0, 0, 16, 17] == pytest.approx(out[0, 0, 17, 16].item())


def test_t_quantile_and_interval_against_textbook_values():
    """t_{0.975, df} from a printed table (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2): 12.706, 4.303, 3.182,
    2.776, 2.262, 2.042; t_{0.95, 4} = 2.132. The interval of 1..5 is 3 +- 2.776 * sqrt(2.5) / sqrt(5)."""
    for df, value in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert claim_images.t_quantile(0.975, df) == pytest.approx(value, abs=1.5e-3)
    assert claim_images.t_quantile(0.95, 4) == pytest.approx(2.132, abs=1.5e-3)
    mean, lo, hi = claim_images.t_interval([1, 2, 3, 4, 5])
    assert mean == 3 and hi - mean == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), abs=1e-3)
    assert mean - lo == pytest.approx(hi - mean)


def test_every_arm_starts_from_the_same_bytes_and_sees_the_same_batches():
    """Every arm loads the one pretrained checkpoint (its sha256) and trains on a prefix of one batch stream: the
    stream drawn here independently with data.random_batch from a generator seeded 1000 + seed (N batches, 3N for
    "standard 3N"); the arms end at different weights."""
    torch.set_num_threads(1)
    cfg = claim_images.SCALES["quick"]
    alpha_bar = claim_images.sampler.alpha_bar_from_beta(claim_images.sampler.make_beta("cosine"))
    images = data.load_dataset("shapes", seed=0, num_shapes=64)
    held = claim_images.heldout_set(cfg["heldout"], "cpu", alpha_bar)
    start, _ = claim_images.pretrain(cfg, images, held, alpha_bar)
    expected_start = hashlib.sha256(start).hexdigest()
    seed, n = 3, cfg["n_batches"]
    generator = torch.Generator().manual_seed(1000 + seed)
    stream = [data.random_batch(images, cfg["batch_size"], generator) for _ in range(3 * n)]
    expected = [hashlib.sha256(b.numpy().tobytes()).hexdigest() for b in stream]
    batches = claim_images.batch_stream(images, 3 * n, cfg["batch_size"], seed)
    weights = {}
    for arm in claim_images.ARMS:
        ema, record = claim_images.finetune(arm, start, batches, seed, cfg, alpha_bar)
        assert record["start"] == expected_start
        assert record["batches"] == expected[: (3 if arm == "standard 3N" else 1) * n], arm
        weights[arm] = torch.cat([p.flatten() for p in ema.parameters()])
    assert not torch.equal(weights["standard N"], weights["standard 3N"])
    assert not torch.equal(weights["AT"], weights["replay"])  # delta != 0 changes the update


def fake_results(at, std3n, replay):
    """results[arm] = one dict per seed with ddim/5, ddim/10, ddim/50 and ref distances."""
    keys = ("ddim/5", "ddim/10", "ddim/50", "ref")
    return {arm: [dict(fd=dict(zip(keys, row))) for row in rows]
            for arm, rows in (("AT", at), ("standard 3N", std3n), ("replay", replay))}


def test_verdict_applies_the_pre_registered_rule():
    """Supported only if AT beats BOTH controls at NFE 5 or 10 with an interval below 0, and no interval at NFE 50 or
    the reference lies above 0; the verdict names what failed."""
    base = [[1.0, 0.8, 0.5, 0.4], [1.1, 0.9, 0.6, 0.5], [0.9, 0.7, 0.4, 0.3], [1.05, 0.8, 0.5, 0.4],
            [0.95, 0.75, 0.45, 0.35]]
    better = [[a - 0.2 - 0.01 * i, b, c + 0.01 * (-1) ** i, d] for i, (a, b, c, d) in enumerate(base)]
    nfe = (5, 10, 20, 50)
    assert "SUPPORTS" in claim_images.verdict(fake_results(better, base, base), "AT", nfe)
    out = claim_images.verdict(fake_results(better, base, better), "AT", nfe)  # ties replay: no win over it
    assert "does NOT support" in out and "does not beat both" in out
    worse_late = [[a, b, c + 0.3 + 0.01 * i, d] for i, (a, b, c, d) in enumerate(better)]
    out = claim_images.verdict(fake_results(worse_late, base, base), "AT", nfe)
    assert "does NOT support" in out and "visibly worse than standard 3N at ddim/50" in out


def test_shapes_labels_match_the_images():
    """data.shapes_labels reads the generator's own draws: a stable prefix, unused slots exactly beyond the count,
    counts and backgrounds near uniform, and a plain background shows as four equal corner pixels (a gradient almost
    never does)."""
    labels = data.shapes_labels(2000, seed=5)
    short = data.shapes_labels(20, seed=5)
    assert all(np.array_equal(short[k], labels[k][:20]) for k in labels)
    slots = np.arange(3)[None, :]
    assert ((labels["kind"] == -1) == (slots >= labels["count"][:, None])).all()
    assert set(np.unique(labels["kind"])) == {-1, 0, 1, 2}
    assert np.bincount(labels["count"])[1:] / 2000 == pytest.approx([1 / 3] * 3, abs=0.04)
    assert labels["gradient"].mean() == pytest.approx(0.5, abs=0.04)
    images = data.make_shapes(2000, seed=5).astype(int)
    corners = np.stack([images[:, 0, 0], images[:, 0, -1], images[:, -1, 0], images[:, -1, -1]], 1)  # (n, 4, 3)
    equal = (np.abs(corners - corners[:, :1]).max((1, 2)) == 0)
    assert equal[~labels["gradient"]].mean() > 0.9 and equal[labels["gradient"]].mean() < 0.1


def test_quick_run_writes_finite_tables_a_verdict_and_a_figure(tmp_path):
    """`claim_images.py --quick` runs every arm, sampler, the reference, CD and CD + AT, and writes the Markdown tables
    (finite cells), the verdict lines, the JSON record and the PNG figure (values are not checked: too few steps)."""
    argv = ["--quick", "--out", str(tmp_path)]
    claim_images.main(claim_images.parse_args(argv), argv)
    table = (tmp_path / "quick.md").read_text()
    cell = r"(-?[\d.e+-]+) ± (-?[\d.e+-]+)"
    for arm in claim_images.ARMS:
        row = re.search(rf"^\| ddim \| {arm} \|(.*)\|$", table, re.M)
        assert len(re.findall(cell, row.group(1))) == 4 + (arm in claim_images.SCALES["quick"]["ref_arms"])
        assert all(math.isfinite(float(v)) for c in re.findall(cell, row.group(1)) for v in c)
    assert re.search(rf"^\| CD \+ AT \| {cell} \| {cell} \|$", table, re.M)
    assert len(re.findall(r"^- AT( sqrt_d)?: (SUPPORTS|does NOT support)", table, re.M)) == 2
    record = json.loads((tmp_path / "quick.json").read_text())
    assert set(record["results"]) == set(claim_images.ARMS) and len(record["results"]["AT"]) == 2
    assert len({r["start"] for rs in record["records"].values() for r in rs}) == 1
    with Image.open(tmp_path / "quick.png") as image:
        assert image.size[0] > 600 and image.size[1] > 600
