"""ops.pick_path (CPU): which kernel runs for which M, format, shape and GPU."""

import pytest

pytest.importorskip("triton")

from loquant.kernels import ops  # noqa: E402


def test_path_choice():
    """The mma kernel takes 3 <= M <= 64 where K is whole 128-code steps, nf included; other
    shapes fall back to the GEMV (M <= 8), the fused GEMM (int) or dequantize + cuBLAS."""
    assert ops.pick_path(1, 0, 4, 4096, 128) == ops.GEMV
    assert ops.pick_path(3, 0, 4, 4096, 128) == ops.MMA
    assert ops.pick_path(16, 2, 4, 4096, 64) == ops.MMA
    assert ops.pick_path(64, 0, 3, 4096, 32) == ops.MMA
    assert ops.pick_path(4, 2, 4, 4128, 32) == ops.GEMV
    assert ops.pick_path(16, 0, 4, 4128, 32) == ops.GEMM
    assert ops.pick_path(16, 2, 4, 4128, 32) == ops.DEQUANT
    assert ops.pick_path(16, 0, 4, 4096, 16 * 3) == ops.GEMM  # a thread's 32 codes would straddle groups
    assert ops.pick_path(65, 0, 4, 4096, 128) == ops.DEQUANT
    assert ops.pick_path(64, 0, 4, 4096, 128, n=11008, wgmma_sms=132) == ops.WGMMA
    assert ops.pick_path(768, 0, 4, 4096, 128, n=11008, wgmma_sms=132) == ops.WGMMA
    assert ops.pick_path(769, 0, 4, 4096, 128, n=11008, wgmma_sms=132) == ops.DEQUANT
    assert ops.pick_path(768, 2, 4, 4096, 64, n=11008, wgmma_sms=132) == ops.WGMMA  # nf4: 16-bit pairs too
    assert ops.pick_path(769, 2, 4, 4096, 64, n=11008, wgmma_sms=132) == ops.DEQUANT
    assert ops.pick_path(256, 2, 2, 4096, 64, n=11008, wgmma_sms=132) == ops.WGMMA
    assert ops.pick_path(257, 2, 2, 4096, 64, n=11008, wgmma_sms=132) == ops.DEQUANT  # nf2: fp32, dequantize sooner
    assert ops.pick_path(512, 0, 3, 4096, 128, n=11008, wgmma_sms=132) == ops.DEQUANT  # int3: fp32 in wgmma
    assert ops.pick_path(512, 2, 3, 4096, 128, n=11008, wgmma_sms=132) == ops.DEQUANT  # nf3: fp32
    assert ops.pick_path(512, 0, 4, 4096, 128, n=4096, wgmma_sms=132) == ops.DEQUANT  # 128 tiles: under 1.5 waves
    assert ops.pick_path(16, 0, 4, 4096, 128, n=11008, wgmma_sms=132) == ops.MMA
    assert ops.pick_path(64, 0, 4, 4096, 128, n=4096, wgmma_sms=132) == ops.MMA  # 32 tiles: too few for 132 SMs
    assert ops.pick_path(512, 0, 4, 4128, 32, n=11008, wgmma_sms=132) == ops.DEQUANT  # K not whole 128-code steps


def test_dequant_chunks():
    """Whole W below DEQUANT_CHUNK_MIN_M; above, even chunks of about DEQUANT_CHUNK_ROWS rows
    (multiples of 64) that cover every row once."""
    assert ops.dequant_chunks(ops.DEQUANT_CHUNK_MIN_M - 1, 11008) == [(0, 11008)]
    chunks = ops.dequant_chunks(4096, 11008)
    assert chunks == [(0, 2240), (2240, 4480), (4480, 6720), (6720, 8960), (8960, 11008)]
    assert ops.dequant_chunks(4096, 4096) == [(0, 2048), (2048, 4096)]
    assert ops.dequant_chunks(4096, 1000) == [(0, 1000)]
    for n in (1, 63, 3000, 14336):
        chunks = ops.dequant_chunks(8192, n)
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(b0 == a1 and (b0 - a0) % 64 == 0 for (a0, b0), (a1, _) in zip(chunks, chunks[1:], strict=False))


def test_host_arithmetic_matches_triton():
    """The launchers' cdiv / next_pow2 (plain Python) give triton.cdiv / next_power_of_2."""
    import triton

    from loquant.kernels import cdiv, next_pow2

    for a in (1, 2, 3, 63, 64, 65, 11008, 4096 * 11008 + 1):
        assert next_pow2(a) == triton.next_power_of_2(a)
        for b in (1, 2, 7, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b)
