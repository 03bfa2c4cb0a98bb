import pytest
import torch

from loquant.formats import nf_codebook

# QLoRA / bitsandbytes NF4, as published
NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_equals_published_values_exactly():
    assert torch.equal(nf_codebook(4), torch.tensor(NF4, dtype=torch.float32))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_shape(bits):
    book = nf_codebook(bits)
    assert book.numel() == 2**bits
    assert book[0] == -1 and book[-1] == 1
    assert (book == 0).sum() == 1
    assert torch.all(book[1:] > book[:-1])
    # one more positive than negative value (asymmetric, as QLoRA)
    assert (book > 0).sum() == 2 ** (bits - 1) and (book < 0).sum() == 2 ** (bits - 1) - 1
