"""The ADM UNet: the noise-prediction network eps_theta(x_t, t) (or EDM's F_theta(c_in x; c_noise)).

Paper: Wang et al. 2025, arXiv:2502.17099v1; the backbone is ADM, as in the authors' released code
       (cifar_adv_train.sh; docs/method.md §4.4).
Borrowed: ADM (Dhariwal & Nichol 2021, Sec. 3 / improved-diffusion and guided-diffusion `unet.py`): BigGAN-style
          up/down ResBlocks, scale-shift norm ("adaptive group norm"), multi-head attention at 16x16 and 8x8 with the
          "new attention order", zero-initialised output layers; sinusoidal embedding from the Transformer / DDPM.
          The published layouts: improved-diffusion (Nichol & Dhariwal 2021, IDDPM) for the `iddpm-*` presets (4 heads,
          "legacy" attention order, convolutional resampling) and guided-diffusion (ADM) for `cifar10`.
Uses: nothing from this repo.     Used by: dpm_at.py, cm_at.py, sampler.py, experiments/.
Run: python unet.py               (parameter counts and one forward per preset; checks in tests/test_unet.py and
                                   tests/test_adm.py)

For 2-D toy data (experiments/toy_experiment.py) the file also has a small residual MLP with the same time embedding,
`MLPDenoiser`; `build_from_config` rebuilds either network from a checkpoint's `net` dict. `load_adm_state_dict` and
`adm_state_dict` translate between our parameter names and those of the published improved-/guided-diffusion files.

Symbols: noisy input x_t -> x, timestep t (VP index 0..999) or c_noise = ln(sigma)/4 (EDM Table 1) -> noise_label,
         embedding of noise_label -> emb, base width -> model_channels, per-level width factor -> channel_mult
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sizes of the network. Each entry is a dict of UNet kwargs.
PRESETS: dict[str, dict] = {
    # The authors' cifar_adv_train.sh (= improved-diffusion's CIFAR-10 flags with guided-diffusion's
    # resblock_updown, num_head_channels 32, new attention order): ADM's CIFAR-10 model.
    "cifar10": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3, attention_resolutions=(16, 8),
                    num_head_channels=32, dropout=0.3),
    # IDDPM's CIFAR-10 model, cifar10_uncond_50M_500K.pt (improved-diffusion README and script_util.py defaults:
    # num_heads 4, scale-shift norm, conv resampling, legacy attention order; trained with T = 4000, cosine).
    "iddpm-cifar10": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
                          attention_resolutions=(16, 8), num_head_channels=None, num_heads=4,
                          attention_order="legacy", resblock_updown=False, dropout=0.3),
    # IDDPM's unconditional ImageNet 64x64 model, imagenet64_uncond_100M_1500K.pt (same code; channel_mult of
    # script_util.py for 64x64; dropout 0, its default; T = 4000, cosine).
    "iddpm-imagenet64": dict(model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                             attention_resolutions=(16, 8), num_head_channels=None, num_heads=4,
                             attention_order="legacy", resblock_updown=False, dropout=0.0, image_size=64),
    # Ours: a few-minute CPU demo at 32x32: half width, three levels (32, 16, 8), attention only at 8x8.
    "small": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,),
                  num_head_channels=32, dropout=0.1),
    # Ours, for unit tests: levels 32 and 16, one block each, attention at 16; fwd+bwd at batch 8 ~0.2 s on 2 cores.
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
                 num_head_channels=32, dropout=0.0),
    # Ours, for unit tests: the tiny size in the IDDPM layout (4 heads of 8 channels, legacy order, conv resampling).
    "tiny-iddpm": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
                       num_head_channels=None, num_heads=4, attention_order="legacy", resblock_updown=False,
                       dropout=0.0),
    # Ours, for the offline first run (`python dpm_at.py` on 16x16 `silhouettes`): narrow (16, 32, 64 channels), no
    # attention, so that a batch of 16 trains at ~7 steps/s on one CPU core (README, Set-up).
    "demo": dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(),
                 num_head_channels=16, dropout=0.0),
    # Ours: vectors (B, 2) of the 2-D point sets (data.py): the MLPDenoiser below, sized so that the toy
    # experiment's 9 trainings and 5,000+ sampler calls fit in 15 minutes on a 2-core CPU.
    "mlp2d": dict(arch="mlp", hidden=128, depth=3, dropout=0.0),
}


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype, so that bf16/fp16 autocast cannot lose the
    statistics (ADM's GroupNorm32). Same parameters and function as nn.GroupNorm (Wu & He 2018, Eq. 1-3).

    We considered a hand-written channels_last formula for the CUDA fast path (F.group_norm copies channels_last
    input to NCHW there); it stays out until a GPU A/B run shows it faster.
    """

    def __init__(self, channels: int):
        # ADM uses 32 groups; narrower layers (tiny preset) get the largest group count that divides the channels.
        super().__init__(math.gcd(32, channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(noise_label: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i/half), as ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=noise_label.device) / half)
    args = noise_label.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm; up=True / down=True makes it a BigGAN-style resampling block."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, up: bool = False, down: bool = False):
        super().__init__()
        self.up, self.down = up, down
        self.norm1 = GroupNorm32(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # One linear gives both the scale and the shift of the second norm (ADM's use_scale_shift_norm).
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = GroupNorm32(out_ch)
        self.dropout = nn.Dropout(dropout)
        # ADM zero_module: every residual branch starts as the identity map.
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The h path resamples after the first norm+act and before the first conv; the skip path resamples x itself.
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        scale, shift = self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1)
        # ADM scale-shift norm: h = norm(h) * (1 + scale) + shift
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(self.resample(x)) + h


class Downsample(nn.Module):
    """IDDPM's convolutional downsampling (improved-diffusion `Downsample`, conv_resample): a 3x3 conv of stride 2."""
    up = False

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # emb is unused: the same call as a ResBlock, so the UNet loop treats every block alike


class Upsample(nn.Module):
    """IDDPM's convolutional upsampling (improved-diffusion `Upsample`): nearest-neighbour x2, then a 3x3 conv."""
    up = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised projection (as ADM).

    Heads: num_head_channels per head (guided-diffusion's num_head_channels) or num_heads in all (improved-diffusion's
    num_heads); give one. order: how the 3C channels of the qkv conv are read, "new" (guided-diffusion's
    use_new_attention_order: [q | k | v], each split into heads) or "legacy" (improved-diffusion's QKVAttention:
    [head 0: q k v | head 1: q k v | ...]). The two orders compute the same function up to a permutation of the qkv
    conv's output channels, but a published file works only with the order it was trained with.
    """

    def __init__(self, channels: int, num_head_channels: int | None = None, num_heads: int | None = None,
                 order: str = "new"):
        super().__init__()
        if (num_head_channels is None) == (num_heads is None):
            raise ValueError("give the attention heads as num_head_channels or as num_heads, exactly one of them")
        if order not in ("new", "legacy"):
            raise ValueError(f"unknown attention order {order!r}; choose 'new' or 'legacy'")
        if num_heads is None and channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        self.heads = num_heads or channels // num_head_channels
        if channels % self.heads:
            raise ValueError(f"{channels} channels do not split into {self.heads} heads")
        self.order = order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        # Split into q, k, v, each (B, heads, H*W, C/heads): "new" reads channel (j, head, i), "legacy" (head, j, i),
        # j = 0, 1, 2 for q, k, v and i the channel within the head.
        if self.order == "new":
            q, k, v = qkv.reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(dim=1)
        else:
            q, k, v = qkv.reshape(B, self.heads, 3, C // self.heads, H * W).transpose(-1, -2).unbind(dim=2)
        # softmax(q k^T / sqrt(C/heads)) v; ADM scales q and k by (C/heads)^(-1/4) each, which is the same.
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    """ADM UNet: (x (B, C, H, W), noise_label (B,)) -> (B, out_channels, H, W).

    The defaults of the switches are guided-diffusion's CIFAR-10 layout; improved-diffusion's is num_heads=4 (with
    num_head_channels=None), attention_order="legacy", resblock_updown=False (convolutional resampling).
    time_scale multiplies the noise label before the embedding: 1000 / T reproduces improved-diffusion's
    rescale_timesteps (on by default there), so a T = 4000 model sees t / 4.
    """

    def __init__(self, in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
                 attention_resolutions=(16, 8), num_head_channels=32, dropout=0.0, image_size=32, num_heads=None,
                 attention_order="new", resblock_updown=True, time_scale=1.0):
        super().__init__()
        self.model_channels = model_channels
        self.time_scale = time_scale
        emb_ch = 4 * model_channels
        self.emb_mlp = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def attention(ch: int, res: int) -> nn.Module:
            return AttentionBlock(ch, num_head_channels, num_heads, attention_order) \
                if res in attention_resolutions else nn.Identity()

        def down(ch: int) -> nn.Module:  # BigGAN-style ResBlock (guided-diffusion resblock_updown) or IDDPM's conv
            return ResBlock(ch, ch, emb_ch, dropout, down=True) if resblock_updown else Downsample(ch)

        def up(ch: int) -> nn.Module:
            return ResBlock(ch, ch, emb_ch, dropout, up=True) if resblock_updown else Upsample(ch)

        # Encoder. Every block output is kept as a skip for the decoder, including the input conv and down blocks.
        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc_blocks, self.enc_attn = nn.ModuleList(), nn.ModuleList()
        ch, res, skip_chs = model_channels, image_size, [model_channels]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.enc_blocks.append(ResBlock(ch, mult * model_channels, emb_ch, dropout))
                ch = mult * model_channels
                self.enc_attn.append(attention(ch, res))
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.enc_blocks.append(down(ch))
                self.enc_attn.append(nn.Identity())
                res //= 2
                skip_chs.append(ch)

        # Middle, at the lowest resolution: attention here always, as ADM.
        self.mid_block1 = ResBlock(ch, ch, emb_ch, dropout)
        self.mid_attn = AttentionBlock(ch, num_head_channels, num_heads, attention_order)
        self.mid_block2 = ResBlock(ch, ch, emb_ch, dropout)

        # Decoder: num_res_blocks + 1 blocks per level, each concatenating one skip; an up block ends each level
        # except the last and takes no skip.
        self.dec_blocks, self.dec_attn = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.dec_blocks.append(ResBlock(ch + skip_chs.pop(), mult * model_channels, emb_ch, dropout))
                ch = mult * model_channels
                self.dec_attn.append(attention(ch, res))
            if level != 0:
                self.dec_blocks.append(up(ch))
                self.dec_attn.append(nn.Identity())
                res *= 2

        self.out_norm = GroupNorm32(ch)
        self.out_conv = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: torch.Tensor, noise_label) -> torch.Tensor:
        # A python float or 0-dim label is shared by the batch; a per-sample (B, 1, 1, 1) c_noise is flattened (as EDM).
        noise_label = torch.as_tensor(noise_label, dtype=torch.float32, device=x.device)
        noise_label = noise_label.reshape(-1).expand(x.shape[0])  # (B,)
        if self.time_scale != 1.0:
            # IDDPM's rescale_timesteps (improved-diffusion gaussian_diffusion._scale_timesteps, respace._WrappedModel):
            # the network sees t * 1000 / T, so every caller passes the plain index t
            noise_label = noise_label * self.time_scale
        emb = self.emb_mlp(timestep_embedding(noise_label, self.model_channels))  # (B, 4 * model_channels)

        h = self.input_conv(x)
        skips = [h]
        for block, attn in zip(self.enc_blocks, self.enc_attn):
            h = attn(block(h, emb))
            skips.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)

        for block, attn in zip(self.dec_blocks, self.dec_attn):
            if not block.up:
                h = torch.cat([h, skips.pop()], dim=1)
            h = attn(block(h, emb))

        return self.out_conv(F.silu(self.out_norm(h)))  # (B, out_channels, H, W)


class MLPBlock(nn.Module):
    """Residual block for vectors: h + W2(dropout(silu(W1 silu(h) + W_emb silu(emb)))).

    No normalisation layer: on the 8-Gaussian ring a LayerNorm version learned only a blurred ring in the same
    number of steps (sliced W2 at DDIM-50 0.055 vs 0.030; data vs data 0.015-0.026).
    """

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        # As ADM's zero_module: the block starts as the identity map.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # emb holds one row per distinct noise label; index maps each sample to its row
        u = self.fc1(F.silu(h)) + self.emb_proj(F.silu(emb))[index]
        return h + self.fc2(self.dropout(F.silu(u)))


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t) for vector data: (x (B, d), noise_label (B,)) -> (B, out_channels).

    The keyword names follow UNet's so that a checkpoint's `net` dict reads the same way: in_channels = d, the
    number of coordinates of a sample (2 for the point sets), out_channels = d (or 2d with learned variance).
    The noise label goes through the same sinusoidal embedding as the UNet (VP index t or EDM's c_noise).
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 2, hidden: int = 256, depth: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.hidden = hidden
        self.emb_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(in_channels, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, dropout) for _ in range(depth))
        self.out = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.out.weight)  # ADM: zero-initialised output layer
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, noise_label) -> torch.Tensor:
        noise_label = torch.as_tensor(noise_label, dtype=torch.float32, device=x.device)
        noise_label = noise_label.reshape(-1).expand(x.shape[0])  # (B,), as in UNet.forward
        # The embedding path depends on the label only, so we run it once per distinct label (a sampler step
        # shares one label across the batch); this halves the cost of sampling 10,000 points on a CPU. unique() is
        # a host sync on a GPU; this network is for the CPU toy runs, the UNet has no such step.
        labels, index = torch.unique(noise_label, return_inverse=True)
        emb = self.emb_mlp(timestep_embedding(labels, self.hidden))  # (distinct labels, hidden)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb, index)
        return self.out(F.silu(h))  # (B, out_channels)


def build_from_config(cfg: dict) -> nn.Module:
    """The network of a checkpoint's `net` dict: arch "mlp" -> MLPDenoiser, "unet" or no arch key -> UNet.

    UNet configs carry no arch key (checkpoints written before the MLP existed read unchanged).
    """
    kwargs = {k: v for k, v in cfg.items() if k != "arch"}
    arch = cfg.get("arch", "unet")
    if arch == "mlp":
        return MLPDenoiser(**kwargs)
    if arch == "unet":
        return UNet(**kwargs)
    raise ValueError(f"unknown arch {arch!r} in the network config; expected 'unet' or 'mlp'")


def preset_config(preset: str, learn_sigma: bool = False, dropout: float | None = None, in_channels: int = 3,
                  image_size: int | None = None, time_scale: float = 1.0) -> dict:
    """The `net` dict (constructor kwargs, plus arch for the MLP) of a PRESETS entry.

    learn_sigma doubles the output to ADM's [eps, v] (IDDPM learned variance). For an MLP preset in_channels is the
    vector length d and image_size is ignored; for a UNet it defaults to the preset's (64 for iddpm-imagenet64,
    else 32). time_scale != 1 (IDDPM's rescale_timesteps, 1000 / T) is recorded; 1 is left out, as before.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset], in_channels=in_channels, out_channels=2 * in_channels if learn_sigma else in_channels)
    if dropout is not None:
        cfg["dropout"] = dropout
    if time_scale != 1.0:
        cfg["time_scale"] = time_scale
    if cfg.get("arch") == "mlp":
        return cfg
    return dict(cfg, image_size=image_size if image_size is not None else cfg.get("image_size", 32))


def build_unet(preset: str, learn_sigma: bool = False, dropout: float | None = None, in_channels: int = 3,
               image_size: int | None = None) -> nn.Module:
    """The network of a PRESETS entry (a UNet, or an MLPDenoiser for "mlp2d"); see preset_config."""
    return build_from_config(preset_config(preset, learn_sigma, dropout, in_channels, image_size))


# --- The published files' parameter names (improved-diffusion / guided-diffusion `UNetModel.state_dict()`) ---
# Their UNetModel is input_blocks[0] = the input conv, then one TimestepEmbedSequential per encoder block ([ResBlock,
# attention] or [down block]); middle_block = [ResBlock, attention, ResBlock]; output_blocks = one per decoder ResBlock
# ([ResBlock, attention, up block], each part optional but the first); time_embed = [Linear, SiLU, Linear];
# out = [GroupNorm, SiLU, conv]. Inside a ResBlock: in_layers = [norm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [norm, SiLU, dropout, conv], skip_connection. Attention convs are 1-D there, (C', C, 1); ours are
# (C', C, 1, 1).
RESBLOCK_NAMES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "emb_proj"),
                  ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "skip"))
ATTENTION_NAMES = (("norm", "norm"), ("qkv", "qkv"), ("proj_out", "proj"))
ADM_MARKERS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")


def _module_names(theirs: str, ours: str, module: nn.Module) -> list[tuple[str, str]]:
    """(their module name, our module name) for one of our blocks."""
    if isinstance(module, ResBlock):
        return [(f"{theirs}.{a}", f"{ours}.{b}") for a, b in RESBLOCK_NAMES]
    if isinstance(module, AttentionBlock):
        return [(f"{theirs}.{a}", f"{ours}.{b}") for a, b in ATTENTION_NAMES]
    if isinstance(module, Downsample):
        return [(f"{theirs}.op", f"{ours}.op")]
    if isinstance(module, Upsample):
        return [(f"{theirs}.conv", f"{ours}.conv")]
    raise ValueError(f"no published counterpart for {type(module).__name__}")


def adm_key_map(net: UNet) -> list[tuple[str, str]]:
    """(their key, our key) for every tensor of net, in their state dict's order."""
    modules = [("time_embed.0", "emb_mlp.0"), ("time_embed.2", "emb_mlp.2"), ("input_blocks.0.0", "input_conv")]
    for i, (block, attn) in enumerate(zip(net.enc_blocks, net.enc_attn)):
        modules += _module_names(f"input_blocks.{i + 1}.0", f"enc_blocks.{i}", block)
        if isinstance(attn, AttentionBlock):
            modules += _module_names(f"input_blocks.{i + 1}.1", f"enc_attn.{i}", attn)
    for k, (name, module) in enumerate([("mid_block1", net.mid_block1), ("mid_attn", net.mid_attn),
                                        ("mid_block2", net.mid_block2)]):
        modules += _module_names(f"middle_block.{k}", name, module)
    j, part = -1, 0  # their output block and the position inside it
    for i, (block, attn) in enumerate(zip(net.dec_blocks, net.dec_attn)):
        j, part = (j, part) if block.up else (j + 1, 0)  # an up block joins the output block of the ResBlock before it
        modules += _module_names(f"output_blocks.{j}.{part}", f"dec_blocks.{i}", block)
        part += 1
        if isinstance(attn, AttentionBlock):
            modules += _module_names(f"output_blocks.{j}.{part}", f"dec_attn.{i}", attn)
            part += 1
    modules += [("out.0", "out_norm"), ("out.2", "out_conv")]
    # every parameter of each module (an Identity skip has none, and neither has a counterpart)
    return [(f"{theirs}.{p}", f"{ours}.{p}") for theirs, ours in modules
            for p, _ in net.get_submodule(ours).named_parameters(recurse=False)]


def _their_shape(our_key: str, shape: torch.Size) -> tuple:
    # attention's 1x1 convs are Conv1d in improved-/guided-diffusion (conv_nd(1, ...)): drop our last kernel dim
    return tuple(shape[:-1]) if our_key.endswith((".qkv.weight", ".proj.weight")) else tuple(shape)


def is_adm_state_dict(obj) -> bool:
    """True for a flat dict of tensors with improved-/guided-diffusion's UNetModel names (a published file)."""
    return isinstance(obj, dict) and all(k in obj for k in ADM_MARKERS) and \
        all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_adm_state_dict(net: UNet, state_dict: dict) -> None:
    """Copy a published improved-/guided-diffusion state dict into net. Strict: every tensor of the file is used and
    every one of ours is filled, with equal shapes; the first difference raises a one-line ValueError."""
    ours, new = net.state_dict(), {}
    pairs = adm_key_map(net)
    for theirs, mine in pairs:
        if theirs not in state_dict:
            raise ValueError(f"the file has no tensor {theirs}, which this network needs (for {mine})")
        tensor, want = state_dict[theirs], _their_shape(mine, ours[mine].shape)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != want:
            raise ValueError(f"{theirs} has shape {tuple(getattr(tensor, 'shape', ()))} in the file, "
                             f"{want} in this network")
        new[mine] = tensor.reshape(ours[mine].shape)
    used = {theirs for theirs, _ in pairs}
    extra = [k for k in state_dict if k not in used]
    if extra:
        raise ValueError(f"the file has {len(extra)} tensor(s) this network does not use, the first {extra[0]}")
    net.load_state_dict(new)


def adm_state_dict(net: UNet) -> dict:
    """net's weights under improved-/guided-diffusion's names and shapes (the inverse of load_adm_state_dict)."""
    ours = net.state_dict()
    return {theirs: ours[mine].detach().reshape(_their_shape(mine, ours[mine].shape)).clone()
            for theirs, mine in adm_key_map(net)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    for preset in args.preset or list(PRESETS):
        vector = PRESETS[preset].get("arch") == "mlp"  # 2-D points (B, 2) instead of images (B, 3, S, S)
        channels, size = (2, 0) if vector else (3, PRESETS[preset].get("image_size", 32))
        with torch.device("meta"):  # the count alone: shapes without memory
            n_eps = count_parameters(build_unet(preset, in_channels=channels))
        net = build_unet(preset, learn_sigma=True, in_channels=channels).to(args.device).eval()
        x = torch.randn(2, 2, device=args.device) if vector else torch.randn(2, 3, size, size, device=args.device)
        t = torch.tensor([0.0, 999.0], device=args.device)
        with torch.no_grad():
            net(x, t)  # warm-up
            start = time.perf_counter()
            out = net(x, t)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        print(f"{preset:16s} params {n_eps:,} (eps only), {count_parameters(net):,} (learn_sigma); "
              f"forward {tuple(x.shape)} -> {tuple(out.shape)} in {seconds * 1000:.1f} ms on {args.device}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=None,
                        help="UNet sizes to build; default: all presets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
