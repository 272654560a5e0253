"""Dequantisation against independent numpy implementations of the formats."""
import numpy as np
import torch

from moescope.arch.expr import ExpressionError, evaluate
from moescope.arch.quant import dequantize_fp8_blocks, dequantize_mxfp4, quantize_fp8_blocks, quantize_mxfp4

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


def test_mxfp4_matches_numpy_definition():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 134, (3, 5, 2), generator=g, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales).numpy()
    b, s = blocks.numpy(), scales.numpy().astype(np.int64)
    want = np.zeros((3, 5, 64))
    for i, j, k, byte in np.ndindex(3, 5, 2, 16):
        value = b[i, j, k, byte]
        scale = 2.0 ** (s[i, j, k] - 127)
        want[i, j, k * 32 + 2 * byte] = _e2m1(value & 0x0F) * scale      # low nibble first
        want[i, j, k * 32 + 2 * byte + 1] = _e2m1(value >> 4) * scale
    np.testing.assert_array_equal(got, want)


def test_mxfp4_roundtrip_is_close():
    x = torch.randn(4, 64)
    blocks, scales = quantize_mxfp4(x)
    err = (dequantize_mxfp4(blocks, scales) - x).abs().max()
    assert err < 0.3 * x.abs().max()


def test_fp8_block_dequant_matches_numpy():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(10, 7, generator=g) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=g) + 0.5
    got = dequantize_fp8_blocks(w, scale, (4, 4)).numpy()
    wf, s = w.float().numpy(), scale.numpy()
    want = np.array([[wf[i, j] * s[i // 4, j // 4] for j in range(7)] for i in range(10)])
    np.testing.assert_allclose(got, want, rtol=0, atol=0)


def test_fp8_roundtrip_is_close():
    x = torch.randn(16, 24)
    q, s = quantize_fp8_blocks(x, (8, 8))
    assert (dequantize_fp8_blocks(q, s, (8, 8)) - x).abs().max() < 0.07 * x.abs().max()


def test_expressions():
    ns = {"a": 3, "cfg": {"k": 4}, "layers": [1, 2]}
    assert evaluate("a * cfg.k + 1", ns) == 13
    assert evaluate("a >= 3 and 2 in layers", ns) is True
    assert evaluate("1 if a > 5 else 2", ns) == 2
    assert evaluate(7, ns) == 7
    for bad in ("missing + 1", "__import__('os')", "a.__class__"):
        try:
            evaluate(bad, ns)
        except ExpressionError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
