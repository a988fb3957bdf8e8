"""The GPU fast path (channels_last, bf16 autocast, fused AdamW) keeps the numbers of the plain fp32 path, and a
training step never waits for the device (no host sync)."""
import copy

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
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    net = copy.deepcopy(net).to(memory_format=memory_format)
    x0 = x0.contiguous(memory_format=memory_format)
    noise_fn, loss_fn = dpm_at.make_losses("ddpm", alpha_bar, torch.Generator().manual_seed(0))
    x_t, t, eps, _ = noise_fn(x0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None):
        loss = loss_fn(net, x0, x_t, t, eps, torch.zeros_like(x_t)).mean()
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
    """On CPU the fast path changes nothing: no compile, unfused AdamW, fp32 by default."""
    args = dpm_at.resolve_args(dpm_at.parse_args(["--tiny", "--device", "cpu"]))
    net = unet.build_unet("tiny")
    train_net, opt = dpm_at.fast_path(net, "cpu", 1e-3)
    assert train_net is net and args.precision == "fp32" and not opt.defaults["fused"]


@pytest.mark.parametrize("device, torchrun, flag, expected", [
    ("cuda", False, None, "reduce-overhead"),  # one GPU: CUDA graphs
    ("cuda", True, None, "default"),  # torchrun: CUDA graphs with DDP are untested here
    ("cpu", False, None, "default"),  # no CUDA graphs on a CPU
    ("cuda", False, "default", "default"),  # an explicit flag wins
    ("cuda", False, "max-autotune", "max-autotune")])
def test_compile_mode_default(monkeypatch, device, torchrun, flag, expected):
    """--compile's mode: CUDA graphs on one GPU unless a mode is given."""
    if torchrun:
        monkeypatch.setenv("RANK", "0")
    else:
        monkeypatch.delenv("RANK", raising=False)
    argv = ["--tiny", "--device", device, "--compile"] + (["--compile-mode", flag] if flag else [])
    assert dpm_at.resolve_args(dpm_at.parse_args(argv)).compile_mode == expected


# aten ops that wait for the device on CUDA: a scalar read, or an output whose shape depends on the data
HOST_SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
                 "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave")


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op that runs (forward and backward), and the bool-mask indexing ops among them."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                            for a in args if isinstance(a, (list, tuple)) for i in a):
            name = "bool-mask " + name  # x[mask] needs nonzero(mask): a sync
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_op_log_sees_host_syncs():
    """The detector itself: a scalar read, a boolean mask and unique() are flagged (else the test below is moot)."""
    x = torch.randn(5)
    with OpLog() as log:
        x.sum().item(), x[x > 0], torch.unique(x)
    flagged = {op for op in log.ops if op in HOST_SYNC_OPS or op.startswith("bool-mask")}
    assert flagged == {"_local_scalar_dense", "bool-mask index", "_unique2"}


@pytest.mark.parametrize("argv", [
    ["--dataset", "cifar10", "--preset", "tiny", "--batch-size", "4"],  # hybrid loss, loss-second-moment t, AT K=3
    ["--loss", "edm", "--batch-size", "4"],
    ["--adv-steps", "0", "--input-perturbation", "0.1", "--batch-size", "4"]])
def test_train_step_has_no_host_sync(argv):
    """No .item() or other host sync inside a training step (AT passes, EMA, optimizer, t-sampler), checked
    at the aten level on CPU; the t-sampler's history is made warm so that its importance-sampling branch runs."""
    args = dpm_at.resolve_args(dpm_at.parse_args(["--tiny", "--device", "cpu", *argv]))
    torch.manual_seed(0)
    net = unet.build_unet(args.preset, learn_sigma=args.learn_sigma)
    ema = copy.deepcopy(net).requires_grad_(False)
    # the CUDA fast path's fused AdamW (its step counter stays a tensor; the CPU default reads it with .item())
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta(args.schedule))
    t_state = dict(history=torch.rand(1000, 10), count=torch.full((1000,), 10)) \
        if args.t_sampler == "loss-second-moment" and args.loss == "ddpm" else None
    noise_fn, loss_fn = dpm_at.make_losses(args.loss, alpha_bar, torch.Generator().manual_seed(0), t_state=t_state,
                                           input_perturbation=args.input_perturbation)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    kw = dict(adv_steps=args.adv_steps, t_state=t_state)
    dpm_at.train_step(net, ema, opt, x0, noise_fn, loss_fn, **kw)  # the optimizer's lazy state first
    with OpLog() as log:
        dpm_at.train_step(net, ema, opt, x0, noise_fn, loss_fn, **kw)
    assert len(log.ops) > 100 and "convolution_backward" in log.ops  # the log saw forward and backward
    assert "_fused_adamw_" in log.ops and "_foreach_lerp_" in log.ops  # ... and the optimizer and the EMA
    assert "multinomial" in log.ops or t_state is None
    syncs = sorted({op for op in log.ops if op in HOST_SYNC_OPS or op.startswith("bool-mask")})
    assert syncs == []
