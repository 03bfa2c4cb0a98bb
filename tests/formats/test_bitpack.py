import pytest
import torch

from loquant.errors import LoquantError
from loquant.formats import pack, packed_nbytes, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 63, 1001, 4096])
def test_round_trip_every_width_and_odd_sizes(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.int64)
    packed = pack(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense_size(bits):
    # b bits per code, no slack, when the count is a multiple of 8
    assert packed_nbytes(576 * 1536, bits) * 8 == 576 * 1536 * bits


def test_three_bit_layout_is_little_endian_runs_of_eight():
    codes = torch.arange(8, dtype=torch.uint8)  # word = sum(i << 3i)
    word = sum(i << (3 * i) for i in range(8))
    assert pack(codes, 3).tolist() == [(word >> (8 * j)) & 0xFF for j in range(3)]


def test_two_dim_codes_pack_row_major():
    codes = torch.tensor([[1, 2], [3, 0]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 0]  # padded to a run of 8 codes


def test_out_of_range_codes_rejected():
    with pytest.raises(LoquantError):
        pack(torch.tensor([8], dtype=torch.uint8), 3)


def test_wrong_packed_length_rejected():
    with pytest.raises(LoquantError, match="bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), 3, 16)
