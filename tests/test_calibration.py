import pytest
import torch

from loquant import LoquantError
from loquant.calibration import block_list, collect, fisher_diagonal, run_sequential
from loquant.model import linear_weight

from tiny_models import tiny_model

WINDOWS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))


def linears(model):
    return {n: m for n, m in model.named_modules() if linear_weight(m) is not None and ".layers." in n}


def test_shared_inputs_share_one_statistic():
    model = tiny_model("llama")
    calib = collect(model, WINDOWS, linears(model), batch_size=4, progress=False)
    p = "model.layers.0"
    assert calib.owner[f"{p}.self_attn.k_proj"] == calib.owner[f"{p}.self_attn.v_proj"] == f"{p}.self_attn.q_proj"
    assert calib.owner[f"{p}.mlp.up_proj"] == f"{p}.mlp.gate_proj"
    assert calib.owner[f"{p}.self_attn.o_proj"] == f"{p}.self_attn.o_proj"
    assert calib.owner[f"{p}.mlp.down_proj"] == f"{p}.mlp.down_proj"
    assert len(calib.stats) == 2 * 4 and calib[f"{p}.mlp.down_proj"].count == 6 * 16


def test_statistics_equal_a_float64_recomputation():
    model = tiny_model("llama")
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].double()))
    calib = collect(model, WINDOWS, linears(model), batch_size=4, progress=False)
    handle.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
    stats = calib["model.layers.1.mlp.down_proj"]
    assert torch.allclose(stats.R, X.T @ X / X.shape[0], rtol=1e-5, atol=1e-8)
    assert torch.allclose(stats.mean_abs, X.abs().mean(0), rtol=1e-6)


def test_sequential_without_changes_equals_one_pass():
    model = tiny_model("qwen2")
    layers = linears(model)
    one_pass = collect(model, WINDOWS, layers, batch_size=4, progress=False)
    seen = {}
    run_sequential(model, WINDOWS, layers, lambda i, c: seen.update({i: c}), batch_size=4, progress=False)
    assert sorted(seen) == [0, 1]
    for calib in seen.values():
        for name in calib.stats:
            assert torch.allclose(calib.stats[name].R, one_pass.stats[name].R, rtol=1e-4, atol=1e-6), name


def test_sequential_sees_the_processed_blocks():
    model = tiny_model("llama")
    layers = linears(model)
    one_pass = collect(model, WINDOWS, layers, batch_size=4, progress=False)
    seen = {}

    def process(i, calib):
        seen[i] = calib
        with torch.no_grad():
            model.model.layers[i].mlp.down_proj.weight.mul_(3)  # block i now outputs something else

    run_sequential(model, WINDOWS, layers, process, batch_size=4, progress=False)
    q = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(seen[1].stats[q].R, one_pass.stats[q].R, rtol=1e-3)


def test_block_list_needs_one_list():
    model = tiny_model("llama")
    assert block_list(model, list(linears(model)))[0] == "model.layers"
    with pytest.raises(LoquantError, match="one list of blocks"):
        block_list(model, [*linears(model), "lm_head"])


def test_fisher_is_the_sum_of_squared_window_gradients():
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.up_proj.weight
    fisher = fisher_diagonal(model, WINDOWS[:3], {"up": w}, progress=False)["up"]
    manual = torch.zeros_like(w)
    for window in WINDOWS[:3]:
        model.zero_grad()
        with torch.enable_grad():
            model(input_ids=window[None], labels=window[None]).loss.backward()
        manual += w.grad.square()
    assert torch.allclose(fisher, manual, rtol=1e-4, atol=1e-12) and fisher.abs().sum() > 0
    assert w.requires_grad  # flags restored
