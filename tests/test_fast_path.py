"""The fast path (channels_last, bf16 autocast, shared free-AT loop) keeps the numbers of the plain fp32 path."""
import copy
from types import SimpleNamespace

import pytest
import torch

import dpm_at
import sampler
import unet


def setup(seed=0):
    torch.manual_seed(seed)
    net = unet.build_unet("tiny", learn_sigma=True)
    with torch.no_grad():
        for p in net.parameters():  # leave ADM's zero init so that every layer carries gradient
            p.add_(0.05 * torch.randn_like(p))
    return net


def loss_and_grads(net, x0, memory_format, autocast_dtype=None):
    args = SimpleNamespace(adv_steps=0, loss="ddpm", adv_target="delta_detach", input_perturbation=0.0)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    net = copy.deepcopy(net).to(memory_format=memory_format)
    x0 = x0.contiguous(memory_format=memory_format)
    loss_of_delta, x_t, _ = dpm_at.ddpm_batch(net, x0, alpha_bar, args, torch.Generator().manual_seed(0), None)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None):
        loss = loss_of_delta(torch.zeros_like(x_t)).mean()
    loss.backward()
    return loss.detach(), [p.grad for p in net.parameters()]


def test_channels_last_same_loss_and_gradients():
    """channels_last (the CUDA layout) gives the fp32 loss and parameter gradients of the plain layout."""
    net = setup()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    loss_a, grads_a = loss_and_grads(net, x0, torch.contiguous_format)
    loss_b, grads_b = loss_and_grads(net, x0, torch.channels_last)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_bf16_autocast_loss_tolerance():
    """bf16 autocast keeps the hybrid DDPM loss within 2% of fp32 on the tiny preset (our stated tolerance)."""
    net = setup()
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    loss_fp32, _ = loss_and_grads(net, x0, torch.contiguous_format)
    loss_bf16, grads = loss_and_grads(net, x0, torch.contiguous_format, torch.bfloat16)
    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=0.02)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)  # fp32 master weights


def test_fast_path_is_plain_on_cpu():
    """On CPU the fast path changes nothing: no compile, unfused AdamW, fp32, autocast disabled."""
    args = dpm_at.resolve_args(dpm_at.parse_args(["--tiny", "--device", "cpu"]))
    net = unet.build_unet("tiny")
    train_net, opt, autocast = dpm_at.fast_path(net, args)
    assert train_net is net and args.precision == "fp32" and not opt.defaults["fused"]
    assert not torch.is_autocast_enabled()
    with autocast:
        assert not torch.is_autocast_enabled("cpu")
