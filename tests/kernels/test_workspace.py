"""The split-K workspace (loquant.kernels.workspace): the mma kernel leaves it zeroed, so
calls of any shape reuse it without a memset (CUDA only)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from test_triton import layer, poison, reference  # noqa: E402

from loquant import WeightFormat  # noqa: E402
from loquant.kernels import ops, qlinear, workspace  # noqa: E402


@pytest.fixture
def fresh(monkeypatch):
    """A workspace state of this test's own (a new buffer, no stream yet)."""
    monkeypatch.setattr(workspace, "_BUF", {})
    monkeypatch.setattr(workspace, "_STREAM", {})
    return workspace._BUF


def run(q, x, dtype=torch.bfloat16):
    state, A, B, bias = q._kernel_state(dtype)
    return qlinear(x, state, A, B, bias, path=ops.MMA)


def error(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def test_calls_of_any_shape_leave_it_zeroed(fresh):
    """Back-to-back split-K calls (no synchronization between them) on layers of different
    shapes, x rows, formats, dtypes, corrections and forced splits share one buffer: each is
    right only if the one before left its sums and tickets at zero (a tile whose ticket was
    not reset is never written: NaN)."""
    layers = [layer(WeightFormat("int", 4, 128), 4100, 4096, rank=64, bias=True, seed=1),
              layer(WeightFormat("nf", 4, 64), 328, 1024, rank=0, bias=False, seed=2),
              layer(WeightFormat("int-sym", 3, 32), 1000, 2048, rank=5, bias=False, seed=3)]  # fmt: skip
    # (layer, x rows, dtype, forced split or 0)
    cases = [(0, 16, torch.bfloat16, 0), (1, 5, torch.bfloat16, 0), (0, 3, torch.float16, 8),
             (2, 40, torch.bfloat16, 2), (1, 64, torch.float16, 4), (0, 16, torch.bfloat16, 0),
             (2, 7, torch.bfloat16, 0)]  # fmt: skip
    results = []
    with torch.no_grad():
        for i, m, dtype, split in cases:
            x = torch.randn(m, layers[i].in_features, device="cuda", dtype=dtype)
            poison()
            ops.OVERRIDE["mma"] = {"SPLIT": split} if split else {}
            try:
                results.append((i, x, run(layers[i], x, dtype)))
            finally:
                ops.OVERRIDE.clear()
        torch.cuda.synchronize()
    for i, x, y in results:
        assert torch.isfinite(y).all(), "a tile was never written: its ticket was not reset"
        assert error(y, reference(layers[i], x)) < 1e-2
    (buf,) = fresh.values()
    assert buf.numel() >= 64 * 4100 and not buf.any(), "the workspace is not zero after the calls"


def test_two_streams_take_turns(fresh):
    """Eager calls from two streams that the caller released at the same moment (both wait on
    one event behind a sleep): the second stream's call waits for the first one's before it
    uses the buffer, else the two would add into the same sums at once."""
    q = layer(WeightFormat("int", 4, 128), 11008, 4096, rank=0, bias=False, seed=4)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    gate = torch.cuda.Stream()
    xs = [torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    with torch.no_grad():
        run(q, xs[0])  # compiles, and makes the buffer
        torch.cuda.synchronize()
        ys = []
        for pair in range(0, len(xs), 2):
            with torch.cuda.stream(gate):
                torch.cuda._sleep(20_000_000)  # ~10 ms: both calls are queued before it ends
                go = torch.cuda.Event()
                go.record()
            for j, stream in enumerate(streams):
                stream.wait_event(go)
                with torch.cuda.stream(stream):
                    ys.append(run(q, xs[pair + j]))
        torch.cuda.synchronize()
    for x, y in zip(xs, ys, strict=True):
        assert error(y, reference(q, x)) < 1e-2


def test_a_graph_captured_without_a_buffer_zeroes_its_own(fresh):
    """Nothing is allocated into the shared state inside a capture: a graph captured before
    any eager call made the buffer gets its own zeroed workspace (a memset in the graph), and
    is right on every replay."""
    q = layer(WeightFormat("int", 4, 128), 4100, 4096, rank=64, bias=True, seed=5)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        run(q, x)  # compiles outside the capture
        fresh.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = run(q, x)
        assert not fresh, "a buffer made during capture would hold uninitialised memory outside it"
        ref = reference(q, x)
        for _ in range(3):
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert error(y, ref) < 1e-2
