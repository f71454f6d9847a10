"""The DDPM noise-prediction UNet (Ho et al. 2020) used by SDEdit and DDRM.

This is the architecture of the public CelebA-HQ 256x256 checkpoint ``celeba_hq.ckpt``
(registered as ``celeba-hq-ddpm`` in :mod:`iwmf_bench.weights`). It is written from the
DDPM paper; only the *attribute names* follow the original PyTorch port (pesser's
``pytorch_diffusion``, reused by DDRM's ``models/diffusion.py``) so that the checkpoint's
state dict loads with ``strict=True``. The key layout is::

    temb.dense.{0,1}                      timestep-embedding MLP
    conv_in
    down.{level}.block.{i}                ResBlocks (norm1, conv1, temb_proj, norm2, conv2,
                                          nin_shortcut when channels change)
    down.{level}.attn.{i}                 self-attention (norm, q, k, v, proj_out)
    down.{level}.downsample.conv          all but the last level
    mid.block_1, mid.attn_1, mid.block_2
    up.{level}.block.{i}, up.{level}.attn.{i}, up.{level}.upsample.conv
    norm_out, conv_out

``up`` is indexed by resolution level (``up.0`` is the full-resolution level), although
it runs from the coarsest level to the finest.

Differences from the original port that do not change the function (fp32 results agree
to float rounding; tests/test_diffusion_speed.py checks both against written-out references):

* attention goes through :func:`torch.nn.functional.scaled_dot_product_attention` (same
  softmax(q k^T / sqrt(C)) v) on token-major ``(B, 1, HW, C)`` queries, keys and values
  whose last dimension is contiguous. (With the channel-major ``(B, C, HW)`` view
  transposed, as before, the last dimension has stride HW, and CUDA's fused kernels
  (flash, memory-efficient, cuDNN) all refuse such inputs: SDPA then falls back to its
  math backend, an explicit matmul + softmax.) The 1x1 ``q``/``k``/``v`` convolutions run
  as one matrix product over the tokens;
* :class:`GroupNorm` runs in the autocast dtype under autocast (see there);
* the timestep frequencies are computed on the fly (no buffers, so the state dict holds
  exactly the checkpoint's parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters (names as in DDRM's YAML ``model:`` section)."""

    resolution: int
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resamp_with_conv: bool = True

    @classmethod
    def from_dict(cls, resolution: int, model: dict[str, Any]) -> "UNetConfig":
        known = {k: v for k, v in model.items() if k in cls.__dataclass_fields__}
        for key in ("ch_mult", "attn_resolutions"):
            if key in known:
                known[key] = tuple(int(v) for v in known[key])
        return cls(resolution=int(resolution), **known)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape ``(B, dim)``.

    DDPM's convention: frequencies ``10000^(-k/(dim/2 - 1))``, sines then cosines,
    computed in float32 as in the original (the checkpoint was trained that way).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                      * (-math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` that, under autocast, runs in the autocast dtype.

    CUDA autocast lists ``group_norm`` among the ops it runs in float32 (CPU autocast does
    not), so in a bf16 UNet every GroupNorm upcast its bf16 input, wrote a float32 output,
    the SiLU after it ran in float32 and the next convolution cast back: two extra memory
    passes around each of the UNet's norms (71 in celeba_hq's), about the cost of the bf16 convolutions
    themselves (measured on an H200: bf16 autocast 1.06x over fp32). The kernels
    accumulate the mean and variance in float32 for bf16/fp16 inputs on both CPU and CUDA,
    so only the output is rounded, like any other op's under autocast. The affine
    parameters are cast too (CUDA's kernel wants one dtype). Without autocast: unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind) or x.dtype == torch.float64:
            return super().forward(x)
        low = torch.get_autocast_dtype(kind)
        weight = None if self.weight is None else self.weight.to(low)
        bias = None if self.bias is None else self.bias.to(low)
        with torch.autocast(kind, enabled=False):
            return F.group_norm(x.to(low), self.num_groups, weight, bias, self.eps)


def group_norm(channels: int) -> GroupNorm:
    # 32 groups and eps 1e-6: the TensorFlow DDPM defaults the checkpoint was trained with.
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial) -> (B, positions, C)``: a view for channels-last input, a copy
    otherwise; the channel dimension comes out contiguous, as fused attention needs."""
    return x.flatten(2).transpose(1, 2).contiguous()


def from_tokens(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: ``(B, positions, C)`` back to ``like``'s shape, as a
    view (channels-last strides for 4-D ``like``)."""
    return h.transpose(1, 2).reshape(like.shape)


def pointwise(tokens: torch.Tensor, *convs: nn.Module) -> torch.Tensor:
    """1x1 convolutions applied to ``(B, N, C_in)`` tokens as one matrix product; the
    outputs are concatenated along the last dimension in the order given."""
    weight = torch.cat([c.weight.flatten(1) for c in convs]) if len(convs) > 1 else convs[0].weight.flatten(1)
    bias = torch.cat([c.bias for c in convs]) if len(convs) > 1 else convs[0].bias
    return F.linear(tokens, weight, bias)


class ResBlock(nn.Module):
    """Pre-activation residual block with an additive timestep projection."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 projection of the skip path only where the width changes (checkpoint has
        # ``nin_shortcut`` exactly there).
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, 1 head, HW tokens, C), channels contiguous; SDPA scales by
        # 1/sqrt(C) by default.
        qkv = pointwise(to_tokens(self.norm(x)), self.q, self.k, self.v).unsqueeze(1)
        h = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
        return x + from_tokens(pointwise(h.squeeze(1), self.proj_out), x)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        # TensorFlow "SAME" padding for a stride-2 3x3 conv pads only right and bottom.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class DDPMUNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in ``x_t`` (NCHW, model space [-1,1])."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        temb_ch = 4 * ch
        for width in {ch * m for m in (1, *mult)}:
            if width % 32:
                raise ValueError(f"channel widths must be multiples of 32 (GroupNorm), got {width}")

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Encoder. ``skips`` records the width of every tensor pushed on the skip stack.
        res, width, skips = cfg.resolution, ch, [ch]
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nrb):
                stage.block.append(ResBlock(width, ch * m, temb_ch, cfg.dropout))
                width = ch * m
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(width))
                skips.append(width)
            if level != len(mult) - 1:
                stage.downsample = Downsample(width, cfg.resamp_with_conv)
                res //= 2
                skips.append(width)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(width, width, temb_ch, cfg.dropout)
        self.mid.attn_1 = AttnBlock(width)
        self.mid.block_2 = ResBlock(width, width, temb_ch, cfg.dropout)

        # Decoder: nrb + 1 blocks per level, each concatenating one skip tensor.
        up: list[nn.Module] = [None] * len(mult)  # type: ignore[list-item]
        for level in reversed(range(len(mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(nrb + 1):
                stage.block.append(ResBlock(width + skips.pop(), ch * mult[level], temb_ch, cfg.dropout))
                width = ch * mult[level]
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(width))
            if level != 0:
                stage.upsample = Upsample(width, cfg.resamp_with_conv)
                res *= 2
            up[level] = stage
        self.up = nn.ModuleList(up)

        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.cfg.resolution, self.cfg.resolution):
            raise ValueError(f"UNet expects {self.cfg.resolution}x{self.cfg.resolution} inputs, "
                             f"got {tuple(x.shape[-2:])}")
        temb = timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.cfg.ch)
        temb = temb.to(self.conv_in.weight.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(hs[-1], temb)
                hs.append(stage.attn[i](h) if len(stage.attn) else h)
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)

        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
