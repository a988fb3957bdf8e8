"""Checks of experiments/toy_experiment.py: the sliced W2 against closed forms, and the --quick run end to end."""
import json
import math
import os
import re
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import toy_experiment  # noqa: E402


def gaussian(n, mean, std, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(mean, dtype=torch.float64) + std * torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_sliced_w2_mean_shift_closed_form():
    """SW2(N(0, I), N(m, I)) = |m| / sqrt(2): W2^2 of the projections is (u.m)^2, whose mean over the circle is
    |m|^2 / 2 (Bonneel et al. 2015, Eq. 4); our evenly spaced directions average cos^2 to exactly 1/2."""
    x = gaussian(20000, [0.0, 0.0], 1.0, 0)
    for m in ([1.0, 0.0], [0.6, -0.8], [2.0, 1.0]):
        y = gaussian(20000, m, 1.0, 1)
        assert toy_experiment.sliced_wasserstein(x, y, 32) == pytest.approx(math.hypot(*m) / math.sqrt(2), rel=0.03)
    # the same samples shifted: sorting matches every point with itself, so the estimate is exact
    shifted = x + torch.tensor([0.3, 0.4], dtype=torch.float64)
    assert toy_experiment.sliced_wasserstein(x, shifted, 32) == pytest.approx(0.5 / math.sqrt(2), rel=1e-9)


def test_sliced_w2_scale_closed_form_and_basic_properties():
    """SW2(N(0, s1^2 I), N(0, s2^2 I)) = |s1 - s2| (every projection is N(0, s^2)); SW2 is symmetric, 0 on equal
    sets, and refuses point sets of different sizes."""
    x, y = gaussian(20000, [0.0, 0.0], 1.0, 2), gaussian(20000, [0.0, 0.0], 0.5, 3)
    sw2 = toy_experiment.sliced_wasserstein(x, y, 32)
    assert sw2 == pytest.approx(0.5, rel=0.03)
    assert sw2 == pytest.approx(toy_experiment.sliced_wasserstein(y, x, 32), rel=1e-12)
    assert toy_experiment.sliced_wasserstein(x, x[torch.randperm(len(x))], 32) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same size"):
        toy_experiment.sliced_wasserstein(x, y[:10])


def test_exposure_curve_is_one_for_the_true_marginals():
    """Var[x_e] / (Var[x_0] + d sigma^2) is 1 when the states are drawn from q itself (Ning et al. 2024, Sec. 3)."""
    x0 = gaussian(200000, [0.0, 0.0], 0.5, 4)
    var_x0 = x0.var(0).sum().item()
    log = {s: (x0 + s * gaussian(200000, [0.0, 0.0], 1.0, 5)).var(0).sum().item() for s in (0.1, 1.0, 10.0)}
    curve = toy_experiment.exposure_curve(log, x0, var_x0)
    assert [s for s, _ in curve] == [10.0, 1.0, 0.1, 0.0]
    assert [r for _, r in curve] == pytest.approx([1.0] * 4, abs=0.01)


def test_quick_run_writes_finite_tables_and_a_figure(tmp_path):
    """`toy_experiment.py --quick` trains, samples and reports every method x sampler x NFE cell with finite numbers,
    and writes the Markdown table, the JSON record and the PNG figure (values are not checked: too few steps)."""
    argv = ["--quick", "--out", str(tmp_path)]
    cfg = toy_experiment.parse_args(argv)
    toy_experiment.main(cfg, argv)
    table = (tmp_path / "ring.md").read_text()
    cell = r"(-?[\d.]+|nan|inf) ± (-?[\d.]+|nan|inf)"
    for name in toy_experiment.SAMPLERS:
        for method in ("standard", "replay", "AT", "IP"):
            row = re.search(rf"^\| {name} \| {method} \|(.*)\|$", table, re.M)
            cells = re.findall(cell, row.group(1))
            assert len(cells) == len(cfg.nfe) == 2 and all(math.isfinite(float(v)) for c in cells for v in c)
            row = re.search(rf"^\| {name} \| {method} \| {cell} \| {cell} \|$", table, re.M)  # exposure table
            assert row and all(math.isfinite(float(v)) for v in row.groups())
    record = json.loads((tmp_path / "ring.json").read_text())
    assert set(record["results"]) == {"standard", "replay", "AT", "IP"} and len(record["results"]["AT"]) == 2
    with Image.open(tmp_path / "ring.png") as image:
        assert image.size[0] > 600 and image.size[1] > 600
    assert (tmp_path / "ring.png").stat().st_size < 300_000


def test_budgets_match_what_they_say():
    """--budget steps: every method makes K * at_batches optimizer steps (also the sweep's K = 2 and K = 5);
    --budget batches: every method sees K * at_batches data batches."""
    for sweep in ([], ["--sweep"]):
        steps = toy_experiment.method_table(toy_experiment.parse_args(sweep))
        assert {batches * k for _, batches, k in steps.values()} == {3 * 800}
        same_data = toy_experiment.method_table(toy_experiment.parse_args(sweep + ["--budget", "batches"]))
        assert {batches for _, batches, _ in same_data.values()} == {3 * 800}
        assert {k for _, _, k in same_data.values()} == ({1, 3} if not sweep else {1, 2, 3, 5})
