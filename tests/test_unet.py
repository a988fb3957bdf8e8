"""Checks of unet.py: the ADM UNet (Dhariwal & Nichol 2021), the network of the recipe (docs/method.md §4.4)."""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from unet import PRESETS, build_unet, count_parameters, timestep_embedding


def perturbed(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add fixed Gaussian noise to every weight, so the zero-initialised layers stop hiding the rest of the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


@pytest.fixture(scope="module")
def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(build_unet("tiny", learn_sigma=True)).eval()


def inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,), generator=gen).float()  # (B,) VP timestep indices
    return x, t


def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def resblock_params(c_in: int, c_out: int, emb: int) -> int:
    """Two GroupNorms (2 affine vectors each), two 3x3 convs, the scale-shift Linear, a 1x1 skip if widths differ."""
    first = 2 * c_in + conv_params(c_in, c_out, 3)
    second = 2 * c_out + conv_params(c_out, c_out, 3)
    skip = conv_params(c_in, c_out, 1) if c_in != c_out else 0
    return first + (emb + 1) * 2 * c_out + second + skip


def attention_params(c: int) -> int:
    return 2 * c + conv_params(c, 3 * c, 1) + conv_params(c, c, 1)


def closed_form_count(model_channels, channel_mult, num_res_blocks, attention_levels, in_ch, out_ch, resample):
    """Parameter count of an ADM UNet from its layout (ADM Sec. 3), with `resample` in {"resblock", "conv"}."""
    emb = 4 * model_channels

    def block(c_in: int, level: int) -> int:
        c_out = channel_mult[level] * model_channels
        return resblock_params(c_in, c_out, emb) + (attention_params(c_out) if level in attention_levels else 0)

    def updown(c: int) -> int:
        # guided-diffusion's resblock_updown=True vs improved-diffusion's strided / upsampling 3x3 conv
        return resblock_params(c, c, emb) if resample == "resblock" else conv_params(c, c, 3)

    n = (model_channels + 1) * emb + (emb + 1) * emb + conv_params(in_ch, model_channels, 3)
    ch, skips = model_channels, [model_channels]
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            n += block(ch, level)
            ch = mult * model_channels
            skips.append(ch)
        if level < len(channel_mult) - 1:
            n += updown(ch)
            skips.append(ch)
    n += 2 * resblock_params(ch, ch, emb) + attention_params(ch)
    for level, mult in reversed(list(enumerate(channel_mult))):
        for _ in range(num_res_blocks + 1):
            n += block(ch + skips.pop(), level)
            ch = mult * model_channels
        if level > 0:
            n += updown(ch)
    return n + 2 * ch + conv_params(ch, out_ch, 3)


def test_output_shape():
    """The network maps (B, 3, H, W) to (B, 3, H, W), or (B, 6, H, W) with ADM's learned-variance [eps, v] output."""
    x, t = inputs(3)
    assert build_unet("tiny")(x, t).shape == (3, 3, 32, 32)
    assert build_unet("tiny", learn_sigma=True)(x, t).shape == (3, 6, 32, 32)


def test_noise_label_shapes_broadcast(tiny_net):
    """A float, 0-dim or (B, 1, 1, 1) noise_label (e.g. EDM's c_noise) acts as the same label given as (B,)."""
    x, _ = inputs(2)
    with torch.no_grad():
        expected = tiny_net(x, torch.full((2,), 0.3))
        assert torch.equal(tiny_net(x, 0.3), expected)
        assert torch.equal(tiny_net(x, torch.tensor(0.3)), expected)
        assert torch.equal(tiny_net(x, torch.full((2, 1, 1, 1), 0.3)), expected)


def test_fresh_network_outputs_zero():
    """ADM's zero_module on the output conv makes a freshly built network output exactly zero."""
    x, t = inputs(2)
    out = build_unet("tiny", learn_sigma=True)(x, t)
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_noise_label_and_x(tiny_net):
    """With non-zero weights the output changes with the timestep embedding and with the noisy input x_t."""
    x, t = inputs(2)
    with torch.no_grad():
        out = tiny_net(x, t)
        assert (tiny_net(x, t + 100) - out).abs().max() > 1e-3
        assert (tiny_net(x + 0.1 * torch.randn_like(x), t) - out).abs().max() > 1e-3


def test_timestep_embedding_is_adm_sinusoid():
    """The embedding is [cos(t f), sin(t f)] with f_i = 10000^(-i/half) (ADM / DDPM positional encoding)."""
    t = torch.tensor([0.0, 7.0])
    emb = timestep_embedding(t, 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    assert torch.allclose(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]), atol=1e-6)


def test_small_presets_match_closed_form_count():
    """The tiny and small presets have exactly the parameter count derived from the ADM layout."""
    for preset in ("tiny", "small"):
        cfg = PRESETS[preset]
        levels = {level for level in range(len(cfg["channel_mult"])) if 32 // 2**level in cfg["attention_resolutions"]}
        expected = closed_form_count(cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"], levels,
                                     3, 6, "resblock")
        assert count_parameters(build_unet(preset, learn_sigma=True)) == expected


def test_cifar10_parameter_count():
    """The cifar10 preset is ADM's CIFAR-10 net: 52.5M with conv resampling (iDDPM), ~57.1M with resblock_updown."""
    # improved-diffusion's CIFAR-10 model (learn_sigma, conv up/down) is the commonly cited 52.5M parameters.
    conv_resample = closed_form_count(128, (1, 2, 2, 2), 3, {1, 2}, 3, 6, "conv")
    assert 52.0e6 < conv_resample < 53.0e6
    # The authors' recipe (cifar_adv_train.sh) swaps those convs for BigGAN ResBlocks (resblock_updown), about +4.5M.
    expected = closed_form_count(128, (1, 2, 2, 2), 3, {1, 2}, 3, 6, "resblock")
    assert 56.5e6 < expected < 57.5e6
    net = build_unet("cifar10", learn_sigma=True)
    assert count_parameters(net) == expected
    assert net.enc_blocks[0].dropout.p == 0.3


@pytest.mark.parametrize("preset, n_keys, fingerprint", [
    ("cifar10", 494, "39a8760d58c03f0e"), ("tiny", 144, "3974fa2f02004f8a"), ("mlp2d", 26, "c72934c6ee2ab628")])
def test_state_dict_layout_unchanged(preset, n_keys, fingerprint):
    """Checkpoints written earlier still load: the state dict's key names, order and shapes (learn_sigma) are those
    of the network before GroupNorm32 became a plain fp32 wrapper. The fingerprint is the first 16 hex digits of the
    SHA-256 of the lines "key shape", recorded from unet.py at commit 4329d87."""
    net = build_unet(preset, learn_sigma=True, in_channels=2 if preset == "mlp2d" else 3)
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in net.state_dict().items())
    assert len(net.state_dict()) == n_keys
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == fingerprint


def test_dropout_override():
    """An explicit dropout replaces the preset's value (EDM uses 0.13 on CIFAR-10, ADM 0.3)."""
    net = build_unet("tiny", dropout=0.13)
    assert all(m.p == 0.13 for m in net.modules() if isinstance(m, torch.nn.Dropout))


def test_batch_consistency(tiny_net):
    """In eval mode each sample's output is independent of the rest of the batch (GroupNorm is per sample)."""
    x, t = inputs(3)
    with torch.no_grad():
        batched = tiny_net(x, t)
        single = torch.cat([tiny_net(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_bf16_autocast_close_to_fp32(tiny_net):
    """Under CPU bf16 autocast the output is finite and within 5% relative L2 of fp32 (norms run in fp32)."""
    x, t = inputs(2)
    with torch.no_grad():
        ref = tiny_net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny_net(x, t)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05


def test_channels_last_matches_contiguous(tiny_net):
    """A channels_last input gives the same output as the contiguous one (up to float rounding)."""
    x, t = inputs(2)
    with torch.no_grad():
        out = tiny_net(x.to(memory_format=torch.channels_last), t)
        assert torch.allclose(out, tiny_net(x, t), atol=1e-5)


def test_unknown_preset_raises():
    """An unknown preset name is a ValueError that lists the valid choices."""
    with pytest.raises(ValueError, match="tiny"):
        build_unet("imagenet1024")


def test_gradients_reach_all_parameters():
    """After un-zeroing, one backward pass gives every parameter a non-zero gradient (no dead branch)."""
    torch.manual_seed(0)
    net = perturbed(build_unet("tiny", learn_sigma=True))
    x, t = inputs(2)
    net(x, t).square().mean().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not math.isfinite(p.grad.norm())
            or p.grad.abs().max() == 0]
    assert not dead, dead


def test_mlp_denoiser_shapes_zero_output_and_label_forms():
    """MLPDenoiser maps (B, d) and a label to (B, out_channels); ADM's zero-initialised output gives 0 at init, and a
    shared scalar label equals the same label given per sample."""
    torch.manual_seed(0)
    net = build_unet("mlp2d", in_channels=2)
    x = torch.randn(5, 2)
    assert torch.equal(net(x, torch.full((5,), 7.0)), torch.zeros(5, 2))
    net = perturbed(net)
    out = net(x, torch.tensor([0.0, 10.0, 10.0, 500.0, 999.0]))
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    assert torch.allclose(net(x, 7.0), net(x, torch.full((5,), 7.0)), atol=1e-6)
    # the per-label embedding is reused across samples with the same label: each row depends on its own input only
    assert torch.allclose(net(x[3:4], torch.tensor([500.0])), out[3:4], atol=1e-6)


def test_build_from_config_rebuilds_either_network():
    """build_from_config reads a checkpoint's `net` dict: no arch key (old checkpoints) is the UNet, "mlp" the MLP;
    the state dict of a rebuilt network loads into the original."""
    from unet import MLPDenoiser, UNet, build_from_config, preset_config

    cfg = preset_config("tiny", learn_sigma=True)
    assert "arch" not in cfg and cfg["out_channels"] == 6 and cfg["image_size"] == 32
    assert isinstance(build_from_config(cfg), UNet)
    cfg = preset_config("mlp2d", learn_sigma=True, in_channels=2)
    assert cfg["arch"] == "mlp" and cfg["out_channels"] == 4 and "image_size" not in cfg
    a, b = build_from_config(cfg), build_from_config(dict(cfg))
    assert isinstance(a, MLPDenoiser)
    b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="arch"):
        build_from_config(dict(cfg, arch="transformer"))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_block_matches_adm_new_order(memory_format):
    """AttentionBlock equals ADM's QKVAttention ("new order": qkv split into q, k, v first, then each into heads;
    weights softmax(q^T k / sqrt(d)) over keys), written here with explicit loops over heads, in either layout."""
    from unet import AttentionBlock

    torch.manual_seed(0)
    C, heads, d = 64, 2, 32
    block = perturbed(AttentionBlock(C, num_head_channels=d))
    x = torch.randn(2, C, 4, 5)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x)).flatten(2)  # (B, 3C, T)
        q, k, v = qkv.chunk(3, dim=1)  # each (B, C, T)
        out = []
        for i in range(heads):
            qi, ki, vi = (a[:, i * d:(i + 1) * d] for a in (q, k, v))  # (B, d, T)
            w = torch.softmax(torch.einsum("bct,bcs->bts", qi, ki) / math.sqrt(d), dim=-1)  # (B, T query, S key)
            out.append(torch.einsum("bts,bcs->bct", w, vi))
        expected = x + block.proj(torch.cat(out, dim=1).reshape(x.shape))
        got = block(x.contiguous(memory_format=memory_format))
    assert torch.allclose(got, expected, atol=1e-5)


def test_attention_reads_channels_last_qkv_without_copies(monkeypatch):
    """With channels_last memory (the CUDA fast path), q, k and v reach SDPA as views of the qkv conv's output, with
    the head dimension innermost (stride 1), which is what the fused attention kernels take without a copy."""
    import unet
    from unet import AttentionBlock

    seen, sdpa = [], unet.F.scaled_dot_product_attention

    def spy(q, k, v):
        seen.append((q, k, v))
        return sdpa(q, k, v)

    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", spy)
    block = AttentionBlock(64, num_head_channels=32)
    qkv_out = []
    block.qkv.register_forward_hook(lambda m, i, out: qkv_out.append(out))
    with torch.no_grad():
        block(torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last))
    base = qkv_out[0].untyped_storage().data_ptr()
    assert qkv_out[0].is_contiguous(memory_format=torch.channels_last)
    for a in seen[0]:
        assert a.shape == (2, 2, 16, 32) and a.stride(-1) == 1 and a.untyped_storage().data_ptr() == base


def group_norm_reference(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """Wu & He 2018, Eq. 1-3, written out: per sample and group, the mean and the biased variance over the group's
    channels and all positions; normalise; then the per-channel affine map."""
    B, C = x.shape[:2]
    g = x.reshape(B, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    affine = (1, C) + (1,) * (x.dim() - 2)
    return y * weight.reshape(affine) + bias.reshape(affine)


@pytest.mark.parametrize("shape", [(2, 64, 4, 6), (3, 32, 5, 5), (4, 256)])
def test_group_norm32_is_group_norm(shape):
    """GroupNorm32 equals GroupNorm's formula (above, in float64) and PyTorch's F.group_norm, values and gradients
    for x, gamma and beta; a bf16 input gives a bf16 output within bf16 rounding (the statistics run in fp32)."""
    from unet import GroupNorm32

    torch.manual_seed(0)
    gn = GroupNorm32(shape[1])
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = (3 * torch.randn(shape) + 1).requires_grad_(True)
    w_out = torch.randn(shape)  # a random linear read-out, so that every output feeds the gradients
    y = gn(x)
    grads = torch.autograd.grad((y * w_out).sum(), (x, gn.weight, gn.bias))
    exact = group_norm_reference(x.double(), gn.num_groups, gn.weight.double(), gn.bias.double(), gn.eps)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), exact, atol=2e-5)
    ref = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
    ref_grads = torch.autograd.grad((ref * w_out).sum(), (x, gn.weight, gn.bias))
    assert torch.allclose(y, ref, atol=2e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    y16 = gn(x.detach().bfloat16())
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), gn(x.detach().bfloat16().float()), atol=3e-2, rtol=1e-2)
