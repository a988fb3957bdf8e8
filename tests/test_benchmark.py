"""benchmark.py runs on CPU and prints one well-formed JSON line per configuration (figures, never timed asserts)."""
import json
import math

import benchmark


def test_benchmark_cpu_lines(capsys, tmp_path):
    args = benchmark.parse_args(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "2", "--steps", "1",
                                 "--no-compile", "--sample-batch", "2", "--profile", str(tmp_path / "prof.txt")])
    benchmark.main(args)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert not [line for line in lines if "error" in line]
    kinds = [(line["kind"], line.get("adv_steps"), line.get("sampler")) for line in lines]
    assert kinds == [("sample", None, "heun"), ("sample", None, "ddim"), ("train", 0, None), ("train", 3, None),
                     ("net", None, None), ("profile", None, None)]
    train, at = lines[2], lines[3]
    for key in ("ms_per_batch", "ms_per_update", "img_per_s", "gflop_per_img_pass", "tflop_per_s"):
        assert math.isfinite(train[key]) and train[key] > 0
    assert at["ms_per_update"] == round(at["ms_per_batch"] / 3, 2)  # K = 3 optimizer updates per data batch
    assert lines[0]["nfe"] == 35  # Heun with 18 points: 2N - 1
    assert "aten::convolution" in (tmp_path / "prof.txt").read_text()


def test_flop_count_scales_with_the_batch_and_bad_modes_are_refused():
    """The benchmark counts FLOPs on 2 images and scales them: that is only right if every layer's cost is linear in
    the batch, which a direct count at batch 6 checks. An unknown --compile-modes or --kinds entry is a one-line
    usage error."""
    import pytest
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import unet

    net = unet.build_unet("tiny", learn_sigma=True)
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(6, 3, 32, 32), torch.zeros(6)).float().square().mean().backward()
    assert benchmark.flops_per_image_pass(net, "cpu") * 6 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--compile-modes", "default,fastest"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--kinds", "train,fid"])


def test_native_groupnorm_switch(monkeypatch):
    """--native-groupnorm (the A/B against GroupNorm32's channels_last formula) sends channels_last input to
    F.group_norm, which the formula never calls; both give the same numbers."""
    import torch

    import unet

    monkeypatch.setattr(unet.GroupNorm32, "forward", unet.GroupNorm32.forward)  # restored after the test
    calls, group_norm = [], torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm", lambda *a, **k: calls.append(1) or group_norm(*a, **k))
    gn = unet.GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    formula = gn(x)
    assert not calls
    assert benchmark.parse_args(["--native-groupnorm"]).native_groupnorm
    benchmark.use_native_groupnorm()
    assert torch.allclose(gn(x), formula, atol=1e-5) and calls


def test_kinds_selects_lines(capsys):
    args = benchmark.parse_args(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "2", "--steps", "1",
                                 "--no-compile", "--kinds", "train"])
    benchmark.main(args)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(line["kind"], line["adv_steps"]) for line in lines] == [("train", 0), ("train", 3)]
