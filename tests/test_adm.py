"""The published ADM / IDDPM checkpoints (issue: start from them): unet.py's layouts and name mapping, sampler.py's
reading of a raw state dict on a T = 4000 chain, and data.py's downsampled-ImageNet 64x64 reader.

Reference facts come from the public code, written out here by hand: improved-diffusion's and guided-diffusion's
`UNetModel` constructors (unet.py), `QKVAttention` / `QKVAttentionLegacy`, `space_timesteps` (respace.py),
`_scale_timesteps` (gaussian_diffusion.py), the IDDPM README's flags, and the downsampled-ImageNet row layout
(Chrabaszcz et al. 2017; its loader stacks the R, G and B thirds of each row).
"""
import datetime
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import dpm_at
import sampler
import unet


# --- The published key layout, written from improved-/guided-diffusion's UNetModel constructor ---
def resblock(prefix: str, c_in: int, c_out: int, emb: int) -> list:
    """ResBlock with use_scale_shift_norm (their default): in_layers [norm, SiLU, conv], emb_layers [SiLU, Linear to
    2 c_out], out_layers [norm, SiLU, Dropout, conv], a 1x1 skip_connection when the width changes."""
    keys = [(f"{prefix}.in_layers.0.weight", (c_in,)), (f"{prefix}.in_layers.0.bias", (c_in,)),
            (f"{prefix}.in_layers.2.weight", (c_out, c_in, 3, 3)), (f"{prefix}.in_layers.2.bias", (c_out,)),
            (f"{prefix}.emb_layers.1.weight", (2 * c_out, emb)), (f"{prefix}.emb_layers.1.bias", (2 * c_out,)),
            (f"{prefix}.out_layers.0.weight", (c_out,)), (f"{prefix}.out_layers.0.bias", (c_out,)),
            (f"{prefix}.out_layers.3.weight", (c_out, c_out, 3, 3)), (f"{prefix}.out_layers.3.bias", (c_out,))]
    if c_in != c_out:
        keys += [(f"{prefix}.skip_connection.weight", (c_out, c_in, 1, 1)),
                 (f"{prefix}.skip_connection.bias", (c_out,))]
    return keys


def attention(prefix: str, c: int) -> list:
    """AttentionBlock: norm, a 1-D 1x1 conv to 3C (conv_nd(1, ...)), the 1-D output projection proj_out."""
    return [(f"{prefix}.norm.weight", (c,)), (f"{prefix}.norm.bias", (c,)), (f"{prefix}.qkv.weight", (3 * c, c, 1)),
            (f"{prefix}.qkv.bias", (3 * c,)), (f"{prefix}.proj_out.weight", (c, c, 1)),
            (f"{prefix}.proj_out.bias", (c,))]


def conv3(prefix: str, c_in: int, c_out: int) -> list:
    return [(f"{prefix}.weight", (c_out, c_in, 3, 3)), (f"{prefix}.bias", (c_out,))]


def adm_layout(mc: int, mult: tuple, n_res: int, attention_ds: set, updown: bool, out_ch: int = 6) -> list:
    """(key, shape) of their UNetModel.state_dict(): input_blocks (conv, then [ResBlock, attention?] per block and a
    down block per level but the last: a ResBlock(down=True) with resblock_updown, else Downsample's strided conv
    `op`), middle_block [ResBlock, attention, ResBlock], output_blocks [ResBlock on the concatenated skip, attention?,
    an up block (ResBlock(up=True) or Upsample's `conv`) after the last block of each level but the first]."""
    emb = 4 * mc
    keys = [("time_embed.0.weight", (emb, mc)), ("time_embed.0.bias", (emb,)), ("time_embed.2.weight", (emb, emb)),
            ("time_embed.2.bias", (emb,))] + conv3("input_blocks.0.0", 3, mc)
    chans, ch, ds, b = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            keys += resblock(f"input_blocks.{b}.0", ch, m * mc, emb)
            ch = m * mc
            keys += attention(f"input_blocks.{b}.1", ch) if ds in attention_ds else []
            chans, b = chans + [ch], b + 1
        if level != len(mult) - 1:
            keys += resblock(f"input_blocks.{b}.0", ch, ch, emb) if updown else conv3(f"input_blocks.{b}.0.op", ch, ch)
            chans, b, ds = chans + [ch], b + 1, ds * 2
    keys += resblock("middle_block.0", ch, ch, emb) + attention("middle_block.1", ch) + \
        resblock("middle_block.2", ch, ch, emb)
    b = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(n_res + 1):
            keys += resblock(f"output_blocks.{b}.0", ch + chans.pop(), m * mc, emb)
            ch, part = m * mc, 1
            if ds in attention_ds:
                keys, part = keys + attention(f"output_blocks.{b}.1", ch), 2
            if level and i == n_res:
                keys += resblock(f"output_blocks.{b}.{part}", ch, ch, emb) if updown else \
                    conv3(f"output_blocks.{b}.{part}.conv", ch, ch)
                ds //= 2
            b += 1
    return keys + [("out.0.weight", (ch,)), ("out.0.bias", (ch,))] + conv3("out.2", ch, out_ch)


# The weights (biases left out) of improved-diffusion's UNetModel(in 3, model_channels 32, out 6, num_res_blocks 1,
# attention_resolutions (2,), channel_mult (1, 2), num_heads 4, use_scale_shift_norm): our "tiny-iddpm", derived by
# hand from its constructor. Emb width 128; skip widths 32, 32 (after the Downsample), 32, 64; the decoder concatenates
# them in reverse: 64+64, 64+32, then 64+32, 32+32.
TINY_IDDPM_WEIGHTS = """
time_embed.0.weight 128,32
time_embed.2.weight 128,128
input_blocks.0.0.weight 32,3,3,3
input_blocks.1.0.in_layers.0.weight 32
input_blocks.1.0.in_layers.2.weight 32,32,3,3
input_blocks.1.0.emb_layers.1.weight 64,128
input_blocks.1.0.out_layers.0.weight 32
input_blocks.1.0.out_layers.3.weight 32,32,3,3
input_blocks.2.0.op.weight 32,32,3,3
input_blocks.3.0.in_layers.0.weight 32
input_blocks.3.0.in_layers.2.weight 64,32,3,3
input_blocks.3.0.emb_layers.1.weight 128,128
input_blocks.3.0.out_layers.0.weight 64
input_blocks.3.0.out_layers.3.weight 64,64,3,3
input_blocks.3.0.skip_connection.weight 64,32,1,1
input_blocks.3.1.norm.weight 64
input_blocks.3.1.qkv.weight 192,64,1
input_blocks.3.1.proj_out.weight 64,64,1
middle_block.0.in_layers.0.weight 64
middle_block.0.in_layers.2.weight 64,64,3,3
middle_block.0.emb_layers.1.weight 128,128
middle_block.0.out_layers.0.weight 64
middle_block.0.out_layers.3.weight 64,64,3,3
middle_block.1.norm.weight 64
middle_block.1.qkv.weight 192,64,1
middle_block.1.proj_out.weight 64,64,1
middle_block.2.in_layers.0.weight 64
middle_block.2.in_layers.2.weight 64,64,3,3
middle_block.2.emb_layers.1.weight 128,128
middle_block.2.out_layers.0.weight 64
middle_block.2.out_layers.3.weight 64,64,3,3
output_blocks.0.0.in_layers.0.weight 128
output_blocks.0.0.in_layers.2.weight 64,128,3,3
output_blocks.0.0.emb_layers.1.weight 128,128
output_blocks.0.0.out_layers.0.weight 64
output_blocks.0.0.out_layers.3.weight 64,64,3,3
output_blocks.0.0.skip_connection.weight 64,128,1,1
output_blocks.0.1.norm.weight 64
output_blocks.0.1.qkv.weight 192,64,1
output_blocks.0.1.proj_out.weight 64,64,1
output_blocks.1.0.in_layers.0.weight 96
output_blocks.1.0.in_layers.2.weight 64,96,3,3
output_blocks.1.0.emb_layers.1.weight 128,128
output_blocks.1.0.out_layers.0.weight 64
output_blocks.1.0.out_layers.3.weight 64,64,3,3
output_blocks.1.0.skip_connection.weight 64,96,1,1
output_blocks.1.1.norm.weight 64
output_blocks.1.1.qkv.weight 192,64,1
output_blocks.1.1.proj_out.weight 64,64,1
output_blocks.1.2.conv.weight 64,64,3,3
output_blocks.2.0.in_layers.0.weight 96
output_blocks.2.0.in_layers.2.weight 32,96,3,3
output_blocks.2.0.emb_layers.1.weight 64,128
output_blocks.2.0.out_layers.0.weight 32
output_blocks.2.0.out_layers.3.weight 32,32,3,3
output_blocks.2.0.skip_connection.weight 32,96,1,1
output_blocks.3.0.in_layers.0.weight 64
output_blocks.3.0.in_layers.2.weight 32,64,3,3
output_blocks.3.0.emb_layers.1.weight 64,128
output_blocks.3.0.out_layers.0.weight 32
output_blocks.3.0.out_layers.3.weight 32,32,3,3
output_blocks.3.0.skip_connection.weight 32,64,1,1
out.0.weight 32
out.2.weight 6,32,3,3
"""

# (preset, their arguments: model_channels, channel_mult, num_res_blocks, attention at downsampling rates, resblock
# updown; tensors in their state dict; parameters with learned sigma). Rates: attention at 16 and 8 is ds 2, 4 at 32x32
# and 4, 8 at 64x64 (script_util.py: image_size // res). Tensors: a conv resampler has 2 where a resampling ResBlock
# (same width, no skip) has 10, so each IDDPM layout has 8 fewer per down or up block (tiny: 144 - 2 * 8; CIFAR-10:
# 494 - 6 * 8); ImageNet-64's widths 128, 256, 384, 512 add two encoder skip convs (4 tensors) over CIFAR-10's
# 128, 256, 256, 256. 57,094,662 is the ADM CIFAR-10 count of the issue; the IDDPM files are named 50M and 100M
# (rounded); their counts here are the sums over the layout, as test_unet's closed form.
LAYOUTS = [
    ("tiny", (32, (1, 2), 1, {2}, True), 144, 828_358),
    ("tiny-iddpm", (32, (1, 2), 1, {2}, False), 128, 757_030),
    ("cifar10", (128, (1, 2, 2, 2), 3, {2, 4}, True), 494, 57_094_662),
    ("iddpm-cifar10", (128, (1, 2, 2, 2), 3, {2, 4}, False), 446, 52_546_438),
    ("iddpm-imagenet64", (128, (1, 2, 3, 4), 3, {4, 8}, False), 450, 121_063_942),
]


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero values in every tensor (the zero-initialised layers included), so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def meta_net(preset: str) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only, no memory
        return unet.build_unet(preset, learn_sigma=True)


@pytest.mark.parametrize("preset, layout, n_keys, n_params", LAYOUTS)
def test_layout_equals_published_code(preset, layout, n_keys, n_params):
    """adm_state_dict's names and shapes, in order, are those of their UNetModel.state_dict() for each preset (the
    layout above, written from their constructors), with the tensor and parameter counts of the table."""
    net = meta_net(preset)
    ours = [(k, tuple(v.shape)) for k, v in unet.adm_state_dict(net).items()]
    assert ours == adm_layout(*layout)
    assert len(ours) == n_keys and sum(math.prod(s) for _, s in ours) == n_params == unet.count_parameters(net)


def test_tiny_iddpm_weights_table():
    """The tiny IDDPM layout's weights, written out by hand from improved-diffusion's constructor, equal ours."""
    table = [(k, tuple(int(n) for n in s.split(","))) for k, s in (line.split() for line in
                                                                   TINY_IDDPM_WEIGHTS.split("\n") if line)]
    net = meta_net("tiny-iddpm")
    ours = [(k, tuple(v.shape)) for k, v in unet.adm_state_dict(net).items() if k.endswith("weight")]
    assert ours == table


@pytest.mark.parametrize("preset", ["tiny", "tiny-iddpm", "cifar10", "iddpm-cifar10", "iddpm-imagenet64"])
def test_round_trip_is_bit_exact(preset):
    """UNet -> adm_state_dict -> load_adm_state_dict into a zeroed network gives every tensor back bit for bit."""
    net = perturbed(unet.build_unet(preset, learn_sigma=True))
    theirs = unet.adm_state_dict(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    unet.load_adm_state_dict(net, theirs)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    del net, theirs, before


def test_strict_loading_names_the_first_difference():
    """A missing, unexpected or mis-shaped tensor, or a file of the other layout, is one ValueError line naming it."""
    net = unet.build_unet("tiny-iddpm", learn_sigma=True)
    good = unet.adm_state_dict(net)
    cases = [({k: v for k, v in good.items() if k != "middle_block.1.qkv.bias"}, "no tensor middle_block.1.qkv.bias"),
             (dict(good, extra=torch.zeros(1)), "does not use, the first extra"),
             (dict(good, **{"out.2.weight": torch.zeros(3, 32, 3, 3)}), r"out.2.weight has shape \(3, 32, 3, 3\)"),
             (unet.adm_state_dict(unet.build_unet("tiny", learn_sigma=True)), "no tensor input_blocks.2.0.op.weight")]
    for state, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            unet.load_adm_state_dict(net, state)
        assert "\n" not in str(info.value)
    assert unet.is_adm_state_dict(good) and not unet.is_adm_state_dict(net.state_dict())
    assert not unet.is_adm_state_dict(dict(good, args={"a": 1}))


def attention_reference(x, qkv_conv, proj, heads: int, order: str):
    """Their attention with explicit loops: head h reads q, k, v from channels (legacy, QKVAttentionLegacy) h*3d + j*d
    + i or (new, QKVAttention) j*C + h*d + i, j = 0, 1, 2; w = softmax_s(q_t . k_s / sqrt(d)); out channel h*d + i."""
    B, C, H, W = x.shape
    d = C // heads
    qkv = qkv_conv.flatten(2)  # (B, 3C, T)
    out = []
    for h in range(heads):
        q, k, v = (qkv[:, h * 3 * d + j * d: h * 3 * d + (j + 1) * d] if order == "legacy"
                   else qkv[:, j * C + h * d: j * C + (h + 1) * d] for j in range(3))  # each (B, d, T)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        out.append(torch.einsum("bts,bcs->bct", w, v))
    return x + proj(torch.cat(out, dim=1).reshape(B, C, H, W))


@pytest.mark.parametrize("order", ["legacy", "new"])
def test_attention_orders_match_reference(order):
    """AttentionBlock with 4 heads in either order equals the reference; the two orders differ on the same weights."""
    torch.manual_seed(0)
    block = perturbed(unet.AttentionBlock(64, num_heads=4, order=order))
    x = torch.randn(2, 64, 4, 3)
    with torch.no_grad():
        expected = attention_reference(x, block.qkv(block.norm(x)), block.proj, 4, order)
        assert torch.allclose(block(x), expected, atol=1e-5)
        block.order = "new" if order == "legacy" else "legacy"
        assert not torch.allclose(block(x), expected, atol=1e-3)


def test_time_scale_is_iddpm_rescale_timesteps():
    """time_scale = 1000 / T: the network at index t equals the unscaled one at t * 1000 / 4000 (IDDPM's
    _scale_timesteps), so T = 4000 labels stay in [0, 1000)."""
    torch.manual_seed(0)
    plain = perturbed(unet.build_unet("tiny-iddpm"))
    scaled = unet.build_from_config(unet.preset_config("tiny-iddpm", time_scale=0.25))
    scaled.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3999.0, 10.0])
    with torch.no_grad():
        assert torch.allclose(scaled(x, t), plain(x, t / 4), atol=1e-6)
        assert not torch.allclose(scaled(x, t), plain(x, t), atol=1e-3)


@pytest.mark.parametrize("spec, expected", [
    # "N" (one section of size T = 4000): stride 3999/(N-1), Python's round (halves to even), IDDPM space_timesteps
    ("5", [0, 1000, 2000, 2999, 3999]),  # 0, 999.75, 1999.5 (-> 2000, even), 2999.25, 3999
    ("10", [0, 444, 889, 1333, 1777, 2222, 2666, 3110, 3555, 3999]),  # stride 444.33...
    # "ddimN": the smallest integer stride s with len(range(0, 4000, s)) = ceil(4000 / s) = N
    ("ddim10", list(range(0, 4000, 400))), ("ddim7", [0, 572, 1144, 1716, 2288, 2860, 3432]),  # 4000/571 > 7
    ("ddim50", list(range(0, 4000, 80))),
])
def test_respace_t4000_matches_iddpm(spec, expected):
    """respace on a 4000-step chain gives improved-diffusion's space_timesteps(4000, spec), worked out by hand."""
    assert sampler.respace(spec, 4000) == expected


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    """A raw improved-diffusion state dict of the tiny IDDPM layout (learned sigma), as the published files are."""
    torch.manual_seed(0)
    net = unet.build_unet("tiny-iddpm", learn_sigma=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    path = tmp_path_factory.mktemp("adm") / "iddpm_tiny.pt"
    torch.save(unet.adm_state_dict(net), path)
    return str(path)


def test_adm_checkpoint_format(raw_file):
    """adm_checkpoint gives our format: kind dpm, loss ddpm, T = 4000 cosine (the IDDPM files' diffusion), learned
    sigma read from the file, time_scale 1000/4000; its weights reproduce the file through adm_state_dict."""
    ckpt = sampler.adm_checkpoint(raw_file, "tiny-iddpm")
    assert (ckpt["kind"], ckpt["loss"], ckpt["schedule"], ckpt["diffusion_steps"]) == ("dpm", "ddpm", "cosine", 4000)
    assert ckpt["net"]["out_channels"] == 6 and ckpt["net"]["time_scale"] == 0.25
    net = unet.build_from_config(ckpt["net"])
    net.load_state_dict(ckpt["ema"])
    state = torch.load(raw_file, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in unet.adm_state_dict(net).items())
    # an explicit T = 1000 keeps the plain labels (1000 / T = 1 is not recorded); the schedule is taken as given
    other = sampler.adm_checkpoint(state, "tiny-iddpm", 1000, "linear")
    assert "time_scale" not in other["net"] and (other["diffusion_steps"], other["schedule"]) == (1000, "linear")


@pytest.mark.parametrize("name", ["ddpm", "es", "ddim", "euler", "heun"])
def test_every_sampler_on_a_4000_step_raw_file(raw_file, tmp_path, name, monkeypatch):
    """sampler.py --ckpt RAW --preset tiny-iddpm samples with each sampler on the T = 4000 cosine chain; the network
    only ever sees labels t / 4 in [0, 1000) (IDDPM's rescaling); the stated NFE is met."""
    labels = []
    embed = unet.timestep_embedding
    monkeypatch.setattr(unet, "timestep_embedding", lambda t, dim: (labels.append(t.clone()), embed(t, dim))[1])
    out = tmp_path / "s.npz"
    assert sampler.cli(["--ckpt", raw_file, "--preset", "tiny-iddpm", "--sampler", name, "--steps", "3",
                        "--num", "2", "--device", "cpu", "--out", str(out)]) == 0
    images = np.load(out)["arr_0"]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert len(labels) == sampler.nfe(name, 3)
    # the first step: t = 3999 (ddpm, es), 2668 (ddim3: stride 1334, the smallest with ceil(4000 / s) = 3), or the
    # step nearest to sigma_max = 80 (euler, heun), each divided by 4
    top = max(t.max().item() for t in labels)
    assert top == {"ddpm": 999.75, "es": 999.75, "ddim": 667.0}.get(name, top) and 0 < top < 999.75 + 1e-9


# --- Faults: one "error:" line, exit code 1, no traceback, and earlier files byte-identical ---
@pytest.fixture(scope="module")
def own_ckpt(tmp_path_factory):
    """A dpm_at.py-format checkpoint of the tiny UNet at 16x16 (T = 1000, no diffusion_steps key)."""
    cfg = unet.preset_config("tiny", True, None, 3, 16)
    state = unet.build_from_config(cfg).state_dict()
    path = tmp_path_factory.mktemp("own") / "ckpt.pt"
    torch.save(dict(format="adv-diffusion/1", kind="dpm", loss="ddpm", net=cfg, schedule="cosine", model=state,
                    ema=state, step=0, args={}), path)
    return str(path)


def refused(capsys, argv, match, out_dir):
    """Run the CLI: exit code 1, one stderr line "error: ...match..." (and nothing else: refused before the progress
    bar), no traceback, no new or changed file, no temp file."""
    before = {name: open(os.path.join(out_dir, name), "rb").read() for name in os.listdir(out_dir)}
    capsys.readouterr()
    assert sampler.cli(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], lines
    assert "Traceback" not in lines[0]
    after = {name: open(os.path.join(out_dir, name), "rb").read() for name in os.listdir(out_dir)}
    assert after == before


@pytest.fixture
def out_dir(tmp_path):
    (tmp_path / "s.npz").write_bytes(b"earlier npz")
    (tmp_path / "s.png").write_bytes(b"earlier png")
    return str(tmp_path)


@pytest.mark.parametrize("extra, match", [
    (["--eta", "1.5"], "--eta 1.5: must be in [0, 1]"), (["--es-lambda", "0"], "--es-lambda 0.0: must be > 0"),
    (["--s-churn", "-1"], "--s-churn -1.0"), (["--s-churn", "nan"], "--s-churn nan"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps must be >= 1"), (["--diffusion-steps", "0"], "--diffusion-steps 0"),
    (["--sampler", "ddpm", "--steps", "2000"], "--steps 2000: a 1000-step model respaces to at most 1000"),
    (["--sampler", "ddim", "--steps", "999"], "no integer stride gives 999 DDIM steps out of T = 1000"),
    (["--device", "nosuch"], "is not a torch device"), (["--preset", "tiny"], "describe a raw state dict"),
    (["--weights", "model", "--sampler", "consistency"], "does not fit a dpm checkpoint"),
])
def test_bad_flags_are_one_line(capsys, own_ckpt, out_dir, extra, match):
    """Every numeric flag is range-checked and the checkpoint is checked against the command first (issue 19)."""
    refused(capsys, ["--ckpt", own_ckpt, "--num", "1", "--out", os.path.join(out_dir, "s.npz"), *extra], match, out_dir)


def test_cuda_without_gpu_is_one_line(capsys, own_ckpt, out_dir, monkeypatch):
    """--device cuda on a machine without a GPU is refused before the checkpoint is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(capsys, ["--ckpt", own_ckpt, "--device", "cuda", "--out", os.path.join(out_dir, "s.npz")],
            "no CUDA GPU", out_dir)


def test_bad_checkpoints_are_one_line(capsys, own_ckpt, raw_file, out_dir, tmp_path_factory):
    """A truncated file, a pickle of non-tensor objects, a checkpoint without `model`, weights of another preset, a
    raw state dict without or with the wrong --preset: one error line each, nothing built or written."""
    d = tmp_path_factory.mktemp("bad")
    blob = open(own_ckpt, "rb").read()
    (d / "truncated.pt").write_bytes(blob[:len(blob) // 2])
    torch.save({"when": datetime.date(2025, 1, 1)}, d / "objects.pt")
    ckpt = torch.load(own_ckpt, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k not in ("model", "ema")}, d / "no_model.pt")
    other = unet.build_unet("small", learn_sigma=True, image_size=16).state_dict()
    torch.save(dict(ckpt, model=other, ema=other), d / "other_preset.pt")
    out = ["--out", os.path.join(out_dir, "s.npz"), "--num", "1"]
    for path, extra, match in [(d / "truncated.pt", [], "truncated"), (d / "objects.pt", [], "other than tensors"),
                               (d / "no_model.pt", [], "it has no 'model'"),
                               (d / "other_preset.pt", [], "do not fit the network it describes"),
                               (d / "missing.pt", [], "does not exist"),
                               (raw_file, [], "name its layout with --preset"),
                               (raw_file, ["--preset", "tiny"], "does not fit --preset tiny"),
                               (raw_file, ["--preset", "iddpm-imagenet64"], "does not fit --preset iddpm-imagenet64"),
                               (raw_file, ["--preset", "mlp2d"], "--preset 'mlp2d'")]:
        refused(capsys, ["--ckpt", str(path), *extra, *out], match, out_dir)


@pytest.mark.parametrize("failing", ["npz", "png"])
def test_failed_write_keeps_earlier_files(capsys, own_ckpt, out_dir, monkeypatch, failing):
    """A write that fails half-way (a full disk: OSError) removes its temp file and says in one line that the earlier
    file at that path is intact; it is byte-identical afterwards."""
    def full_disk(f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    if failing == "npz":
        monkeypatch.setattr(sampler.np, "savez", full_disk)
    else:
        monkeypatch.setattr(sampler.Image.Image, "save", lambda self, f, **kw: full_disk(f))
    target = os.path.join(out_dir, f"s.{failing}")
    before = open(target, "rb").read()
    capsys.readouterr()
    assert sampler.cli(["--ckpt", own_ckpt, "--num", "1", "--steps", "2", "--sampler", "ddim",
                        "--out", os.path.join(out_dir, "s.npz")]) == 1
    err = capsys.readouterr().err  # the progress bar's lines come first
    last = err.strip().splitlines()[-1]
    assert err.count("error:") == 1 and last.startswith("error:") and "Traceback" not in err
    assert "No space left" in last and f"any earlier file at {target} is intact" in last
    assert open(target, "rb").read() == before
    assert sorted(os.listdir(out_dir)) == ["s.npz", "s.png"]  # no temp file left


# --- data.py: 64x64 image folders and the downsampled-ImageNet npz batches ---
def test_imagenet64_rows_are_channel_planar(tmp_path):
    """A row is R (64x64, row-major), then G, then B: pixel (y, x) of channel c is row[c * 4096 + 64 y + x]. Batches
    are read in numeric order (2 before 10) from sub-folders too; the result is uint8 (N, 3, 64, 64)."""
    y, x = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    row = np.concatenate([y.ravel(), x.ravel(), np.full(4096, 200)]).astype(np.uint8)  # R = y, G = x, B = 200
    (tmp_path / "part2").mkdir()
    np.savez(tmp_path / "train_data_batch_2.npz", data=np.stack([row, row]), labels=np.array([1, 2]))
    np.savez_compressed(tmp_path / "part2" / "train_data_batch_10.npz", data=np.zeros((1, 12288), np.uint8))
    np.savez(tmp_path / "train_data_batch_1.npz", data=255 - row[None], labels=np.array([3]))
    images = data.load_dataset(f"imagenet64:{tmp_path}", image_size=64)
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
    assert images[1, 0, 5, 9] == 5 and images[1, 1, 5, 9] == 9 and images[1, 2, 5, 9] == 200
    assert images[0, 0, 5, 9] == 250 and images[3].sum() == 0  # batch 1 first, batch 10 last


def test_imagenet64_errors(tmp_path):
    """A missing folder, no batch files, rows of another length (the 32x32 release) or a pickled object array:
    a DatasetError each (allow_pickle=False); image_size other than 64 is refused."""
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load_dataset(f"imagenet64:{tmp_path / 'nope'}", image_size=64)
    with pytest.raises(data.DatasetError, match="no train_data_batch"):
        data.load_dataset(f"imagenet64:{tmp_path}", image_size=64)
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 3072), np.uint8))
    with pytest.raises(data.DatasetError, match="rows of 12288"):
        data.load_dataset(f"imagenet64:{tmp_path}", image_size=64)
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.array([{"a": 1}], dtype=object))
    with pytest.raises(data.DatasetError, match="object"):
        data.load_dataset(f"imagenet64:{tmp_path}", image_size=64)
    with pytest.raises(data.DatasetError, match="64x64"):
        data.load_dataset(f"imagenet64:{tmp_path}", image_size=32)


def test_folder_at_64(tmp_path):
    """An image folder loads at 64x64: centre crop of the short side, resized (ADM's center_crop_arr order)."""
    for i, size in enumerate([(100, 80), (64, 64), (300, 200)]):
        Image.new("RGB", size, (10 * i, 20, 30)).save(tmp_path / f"{i}.png")
    images = data.load_dataset(f"folder:{tmp_path}", image_size=64)
    assert images.shape == (3, 3, 64, 64) and images[2, 0].eq(20).all() and images[:, 2].eq(30).all()


# --- dpm_at.py --init-from a published file: one AT step from each layout (tiny variants), on CPU ---
@pytest.mark.parametrize("preset, T, size", [("tiny", 1000, 32), ("tiny-iddpm", 4000, 32), ("tiny-iddpm", 4000, 64)])
def test_init_from_raw_file_trains_one_at_step(tmp_path, preset, T, size):
    """A raw state dict (guided-diffusion layout: tiny; improved-diffusion layout: tiny-iddpm, at 32 and at 64 from
    downsampled-ImageNet batches) starts an AT run: the weights are the file's, T and the rescaled time labels
    (1000 / T for the IDDPM layout) are recorded, and one batch of K = 3 passes moves the weights."""
    torch.manual_seed(0)
    net = unet.build_unet(preset, learn_sigma=True, image_size=size)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    raw = tmp_path / "published.pt"
    torch.save(unet.adm_state_dict(net), raw)
    if size == 64:
        rows = np.random.default_rng(0).integers(0, 256, (8, 12288), dtype=np.uint8)
        np.savez(tmp_path / "train_data_batch_1.npz", data=rows)
        dataset = ["--dataset", f"imagenet64:{tmp_path}", "--image-size", "64"]
    else:
        dataset = ["--dataset", "shapes", "--num-shapes", "16"]
    out = tmp_path / "run"
    code = dpm_at.cli([*dataset, "--init-from", str(raw), "--preset", preset, "--steps", "1", "--batch-size", "2",
                       "--adv-steps", "3", "--t-sampler", "loss-second-moment", "--grid-every", "1",
                       "--num-grid", "2", "--grid-steps", "2", "--log-every", "1", "--save-every", "1",
                       "--out", str(out), "--device", "cpu"])
    assert code == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["diffusion_steps"] == T and ckpt["step"] == 1 and ckpt["net"]["image_size"] == size
    assert ckpt["net"].get("time_scale", 1.0) == (0.25 if preset == "tiny-iddpm" else 1.0)
    start = unet.adm_state_dict(net)
    trained = unet.build_from_config(ckpt["net"])
    trained.load_state_dict(ckpt["model"])
    moved = unet.adm_state_dict(trained)
    assert set(moved) == set(start)
    assert any(not torch.equal(moved[k], start[k]) for k in start)  # the AT step changed the weights


@pytest.mark.parametrize("flags, match", [
    (["--resume", "{raw}", "--preset", "tiny-iddpm"], "--init-from"),  # no optimizer or step in a published file
    (["--init-from", "{raw}"], "--preset"),  # the layout must be named
    (["--init-from", "{raw}", "--preset", "tiny"], "does not fit --preset tiny"),  # another architecture
    (["--init-from", "{raw}", "--preset", "mlp2d"], "--preset 'mlp2d'"),
])
def test_raw_file_faults_are_one_line(tmp_path, capsys, flags, match):
    """dpm_at.py refuses a published file it cannot use in one line, and writes nothing."""
    torch.manual_seed(0)
    raw = tmp_path / "published.pt"
    torch.save(unet.adm_state_dict(unet.build_unet("tiny-iddpm", learn_sigma=True)), raw)
    code = dpm_at.cli([f.format(raw=raw) for f in flags] + ["--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error:") and match in err, err
    assert not (tmp_path / "r").exists()


def test_imagenet64_dataset_defaults_to_64_and_checks_its_folder(tmp_path, capsys):
    """--dataset imagenet64:DIR trains at 64x64 without --image-size; a missing DIR is one line, nothing written."""
    args = dpm_at.resolve_args(dpm_at.parse_args(["--dataset", f"imagenet64:{tmp_path}"]))
    assert args.image_size == 64
    code = dpm_at.cli(["--dataset", f"imagenet64:{tmp_path / 'nope'}", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "does not exist" in err and not (tmp_path / "r").exists()
