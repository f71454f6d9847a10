"""The ADM noise-prediction UNet (Dhariwal & Nichol 2021, "guided diffusion").

This is the architecture of OpenAI's unconditional ImageNet 256x256 checkpoint
``256x256_diffusion_uncond.pt`` (registered as ``imagenet256-adm`` in
:mod:`iwmf_bench.weights`), which DDRM uses for ImageNet. It is written from the ADM
paper (Dhariwal & Nichol 2021, section 3 and appendix); only the *attribute names* follow
the published code so that the checkpoint loads with ``strict=True``. Compared with the
DDPM UNet (:mod:`.diffusion_unet`) it has

* multi-head attention with a fixed width per head (``num_head_channels``), at several
  resolutions;
* "adaptive group normalization" (``use_scale_shift_norm``): the timestep embedding gives
  a scale and a shift applied after the second GroupNorm of each residual block;
* residual blocks that resample (``resblock_updown``): a ResBlock whose input path and
  skip path are both average-pooled (down) or nearest-upsampled (up);
* a learned variance (``learn_sigma``): twice the image channels out, the noise
  prediction first. DDRM uses only the noise prediction; the defense slices it off.

Key layout (each entry of ``input_blocks`` / ``output_blocks`` is a sequence whose
members are indexed ``.0``, ``.1``, ``.2``)::

    time_embed.{0,2}                       timestep MLP (SiLU at index 1)
    input_blocks.0.0                       the first 3x3 conv
    input_blocks.N.0 (ResBlock), .1 (attention where the resolution has it)
    input_blocks.N.0                       resampling ResBlock between levels
    middle_block.{0,1,2}                   ResBlock, attention, ResBlock
    output_blocks.N.0 (ResBlock), .1 (attention), .1 or .2 (resampling ResBlock)
    out.{0,2}                              GroupNorm, 3x3 conv (SiLU at index 1)
    ResBlock: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection
    attention: norm, qkv (1x1 Conv1d, per head [q; k; v]), proj_out (Conv1d)

Choices that do not change the function (beyond float rounding): attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention` (same softmax(q k^T/sqrt(d)) v
per head) on token-major queries, keys and values whose last dimension is contiguous, as
CUDA's fused attention kernels need (see :mod:`.diffusion_unet`); and GroupNorm runs in
the input's dtype, under autocast in the autocast dtype with float32 statistics (the
published code upcasts to float32; see :class:`.diffusion_unet.GroupNorm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion_unet import GroupNorm, from_tokens, pointwise, to_tokens


@dataclass(frozen=True)
class ADMConfig:
    """ADM hyper-parameters. Names follow guided-diffusion's ``create_model`` except
    ``attention_resolutions``, given here in pixels (e.g. 32, 16, 8) like the DDPM
    configs, not as downsampling factors."""

    resolution: int
    in_channels: int = 3
    num_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 4
    num_head_channels: int = 64  # -1: use num_heads heads instead
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    learn_sigma: bool = True

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @classmethod
    def from_dict(cls, resolution: int, model: dict[str, Any]) -> "ADMConfig":
        unknown = set(model) - set(cls.__dataclass_fields__) - {"type"}
        if unknown:
            raise ValueError(f"unknown ADM model keys: {', '.join(sorted(unknown))}")
        known = {k: v for k, v in model.items() if k != "type"}
        for key in ("channel_mult", "attention_resolutions"):
            if key in known:
                known[key] = tuple(int(v) for v in known[key])
        return cls(resolution=int(resolution), **known)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding, shape ``(B, dim)``: frequencies
    ``max_period^(-k/(dim/2))``, cosines then sines (DDPM's puts sines first and divides
    by ``dim/2 - 1``), in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half))
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels)  # eps 1e-5, torch's default, as in the published model


class Resample(nn.Module):
    """Parameter-free 2x resampling used inside resampling ResBlocks."""

    def __init__(self, up: bool):
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep conditioning, GroupNorm-SiLU-dropout-conv, plus skip.

    ``resample`` ("up"/"down") resamples between the first activation and the first conv,
    and the skip path likewise.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.resample = Resample(resample == "up") if resample else None
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(group_norm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # 1x1 projection only where the width changes (the checkpoint has it exactly there).
        self.skip_connection = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_act, conv = self.in_layers[:2], self.in_layers[2]
        if self.resample is not None:
            h = conv(self.resample(norm_act(x)))
            x = self.resample(x)
        else:
            h = conv(norm_act(x))
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + e))
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over all positions, with a residual connection.

    ``qkv`` is one 1x1 projection whose output channels are grouped per head, and inside
    each head ordered query, key, value (the published "legacy" order)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        d = c // self.heads
        tokens = to_tokens(self.norm(x))  # (B, T, C)
        # Output channel of qkv: head * 3d + {q, k, v} * d + j  ->  (B, heads, 3, T, d).
        qkv = pointwise(tokens, self.qkv).unflatten(-1, (self.heads, 3, d)).permute(0, 2, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # scale 1/sqrt(d)
        h = h.transpose(1, 2).reshape(b, -1, c)  # (B, T, heads * d)
        return x + from_tokens(pointwise(h, self.proj_out), x)


class ConvDownsample(nn.Module):
    """Strided 3x3 conv (padding 1 on every side), used when ``resblock_updown`` is off."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ConvUpsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv, used when ``resblock_updown`` is off."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Sequential):
    """A sequence of ResBlocks (which take the embedding) and attention layers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """ADM's UNet: ``(x_t, t) -> [eps; variance interpolation]`` (``out_channels``)."""

    def __init__(self, cfg: ADMConfig):
        super().__init__()
        self.cfg = cfg
        base, nrb = cfg.num_channels, cfg.num_res_blocks
        emb_ch = 4 * base
        for width in {base * m for m in cfg.channel_mult}:
            if width % 32:
                raise ValueError(f"channel widths must be multiples of 32 (GroupNorm), got {width}")

        def heads(width: int) -> int:
            if cfg.num_head_channels == -1:
                return cfg.num_heads
            if width % cfg.num_head_channels:
                raise ValueError(f"width {width} is not a multiple of num_head_channels {cfg.num_head_channels}")
            return width // cfg.num_head_channels

        def res_block(in_ch: int, out_ch: int, resample: str | None = None) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_ch, cfg.dropout, cfg.use_scale_shift_norm, resample)

        def resampler(width: int, up: bool) -> nn.Module:
            if cfg.resblock_updown:
                return res_block(width, width, "up" if up else "down")
            return ConvUpsample(width) if up else ConvDownsample(width)

        self.time_embed = nn.Sequential(nn.Linear(base, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        # Encoder; ``skips`` is the width of every output the decoder will concatenate.
        width, res = base * cfg.channel_mult[0], cfg.resolution
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, width, 3, padding=1))])
        skips = [width]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(nrb):
                layers: list[nn.Module] = [res_block(width, base * mult)]
                width = base * mult
                if res in cfg.attention_resolutions:
                    layers.append(Attention(width, heads(width)))
                self.input_blocks.append(Block(*layers))
                skips.append(width)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(resampler(width, up=False)))
                skips.append(width)
                res //= 2

        self.middle_block = Block(res_block(width, width), Attention(width, heads(width)), res_block(width, width))

        # Decoder: nrb + 1 blocks per level, each taking one skip; the last one of every
        # level but the finest ends with an upsampler.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            out = base * cfg.channel_mult[level]
            for i in range(nrb + 1):
                layers = [res_block(width + skips.pop(), out)]
                width = out
                if res in cfg.attention_resolutions:
                    layers.append(Attention(width, heads(width)))
                if level and i == nrb:
                    layers.append(resampler(width, up=True))
                    res *= 2
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(group_norm(width), nn.SiLU(), nn.Conv2d(width, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.cfg.resolution, self.cfg.resolution):
            raise ValueError(f"UNet expects {self.cfg.resolution}x{self.cfg.resolution} inputs, "
                             f"got {tuple(x.shape[-2:])}")
        emb = timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.cfg.num_channels)
        emb = self.time_embed(emb.to(self.out[2].weight.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
