"""x_order (CPU): the wgmma kernel's x must be in the K order gluon_mma's decode produces."""

import pytest
import torch

pytest.importorskip("triton")

from loquant.kernels import gluon_wgmma, units  # noqa: E402


def decoded_order(bits: int, bk: int = 128) -> torch.Tensor:
    """The physical code at each logical k of a decoded tile, by applying `_decode`'s
    reshapes and permutes (non-pair path; the pair path yields the same (unit, s', e) order)
    to a tile of physical code indices."""
    cpu = units(bits)[0]
    c = bk // 4
    nu, half, t = c // cpu, cpu // 2, bk // 16
    q, u, s = torch.meshgrid(torch.arange(4), torch.arange(nu), torch.arange(cpu), indexing="ij")
    w = (q * c + u * cpu + s).reshape(1, 4, nu, cpu)
    w = w.reshape(1, 4, nu, 2, half).permute(0, 1, 2, 4, 3)
    return w.reshape(1, 4, t, 2, 2).permute(0, 2, 3, 1, 4).reshape(bk)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_x_order_matches_the_decode(bits):
    order = gluon_wgmma.x_order(bits, 128, torch.device("cpu"))
    assert sorted(order.tolist()) == list(range(128))
    assert torch.equal(order, decoded_order(bits))
