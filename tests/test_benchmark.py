"""experiments/benchmark.py runs on CPU and prints one well-formed JSON line per configuration (figures, never timed
asserts)."""
import json
import math
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import benchmark  # noqa: E402
import unet  # noqa: E402


def run(argv, capsys, monkeypatch) -> list[dict]:
    """benchmark.py's lines for argv at test sizes: 8 x 8 images (the network is convolutional, so they run the same
    code as CIFAR-10's 32 x 32 at a sixteenth of the cost) and one timed call per configuration, without warm-up."""
    timed = benchmark.timed
    monkeypatch.setattr(benchmark, "IMAGE", (3, 8, 8))
    monkeypatch.setattr(benchmark, "timed", lambda fn, device, steps, warmup: timed(fn, device, 1, 0))
    benchmark.main(benchmark.parse_args(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "2", "--steps", "1",
                                         "--no-compile", *argv]))
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_benchmark_cpu_lines(capsys, tmp_path, monkeypatch):
    """Every kind of line (sample, train with K = 0 and K = 3, net, profile) comes out, in order, without an error,
    with finite positive figures."""
    lines = run(["--sample-batch", "2", "--profile", str(tmp_path / "prof.txt")], capsys, monkeypatch)
    assert not [line for line in lines if "error" in line]
    kinds = [(line["kind"], line.get("adv_steps"), line.get("sampler")) for line in lines]
    assert kinds == [("sample", None, "heun"), ("sample", None, "ddim"), ("train", 0, None), ("train", 3, None),
                     ("net", None, None), ("profile", None, None)]
    train, at = lines[2], lines[3]
    for key in ("ms_per_batch", "ms_per_update", "img_per_s", "gflop_per_img_pass", "tflop_per_s"):
        assert math.isfinite(train[key]) and train[key] > 0
    assert at["ms_per_update"] == round(at["ms_per_batch"] / 3, 2)  # K = 3 optimizer updates per data batch
    assert lines[0]["nfe"] == 35  # Heun with 18 points: 2N - 1
    assert lines[0]["precision"] == "fp32"  # sampler.py's default precision
    assert "aten::convolution" in (tmp_path / "prof.txt").read_text()


def test_kinds_selects_lines(capsys, monkeypatch):
    """--kinds times only the kinds named (here the network's forward + backward alone)."""
    assert [line["kind"] for line in run(["--kinds", "net"], capsys, monkeypatch)] == ["net"]


def test_flop_count_scales_with_the_batch_and_bad_modes_are_refused():
    """The benchmark counts FLOPs on 2 images and scales them: that is only right if every layer's cost is linear in
    the batch, which a direct count at batch 6 checks. An unknown --compile-modes or --kinds entry is a one-line
    usage error."""
    net = unet.build_unet("tiny", learn_sigma=True)
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(6, 3, 32, 32), torch.zeros(6)).float().square().mean().backward()
    assert benchmark.flops_per_image_pass(net, "cpu") * 6 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--compile-modes", "default,fastest"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--kinds", "train,fid"])
