"""Dequantisation of quantised expert weights: fp8 with block scales (DeepSeek-V3) and MXFP4 (gpt-oss)."""
from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# e2m1 code -> value; low nibble first within each byte
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight[..., i, j] * scale_inv[..., i // b0, j // b1]`` in float32."""
    rows, cols = weight.shape[-2:]
    b0, b1 = block
    expected = (-(-rows // b0), -(-cols // b1))
    if tuple(scale_inv.shape[-2:]) != expected:
        raise ValueError(f"fp8 scale has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{rows}x{cols} weight in {b0}x{b1} blocks")
    scale = scale_inv.float().repeat_interleave(b0, dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(b1, dim=-1)[..., :cols]
    return weight.float() * scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 ``blocks [..., G, 16]`` (uint8, two e2m1 values a byte) and ``scales [..., G]`` (E8M0)
    -> float32 ``[..., G*32]``."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} disagree")
    lo = FP4_VALUES[(blocks & 0x0F).long()]
    hi = FP4_VALUES[(blocks >> 4).long()]
    values = torch.stack((lo, hi), dim=-1).flatten(-2)                 # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.flatten(-2)


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``dequantize_fp8_blocks`` up to fp8 rounding (used by the checkpoint builder)."""
    rows, cols = weight.shape
    b0, b1 = block
    pad = torch.zeros(-(-rows // b0) * b0, -(-cols // b1) * b1)
    pad[:rows, :cols] = weight.float().abs()
    amax = pad.reshape(pad.shape[0] // b0, b0, pad.shape[1] // b1, b1).amax(dim=(1, 3)).clamp_min(1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    expanded = scale_inv.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return (weight.float() / expanded).to(torch.float8_e4m3fn), scale_inv


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-value MXFP4 encoding of ``values [..., n*32]`` (used by the checkpoint builder)."""
    groups = values.float().unflatten(-1, (-1, 32))                       # [..., G, 32]
    amax = groups.abs().amax(-1).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)       # max |code| is 6
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - FP4_VALUES).abs().argmin(-1).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)
