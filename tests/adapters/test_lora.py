"""PEFT's LoRA on QuantLinear through PEFT's custom-module dispatch, on a model transformers loaded."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loquant.adapters.lora import LoraQuantLinear, lora_layers, pool_matrix, register, repeat_matrix
from loquant.cli import main


def test_get_peft_model_on_a_loquant_model_trains_only_lora(checkpoint, tmp_path):
    assert main(["quantize", str(checkpoint), "--format", "nf", "--bits", "4", "--out", str(tmp_path / "q")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    peft_model = get_peft_model(model, register(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])))
    layers = lora_layers(peft_model)
    assert len(layers) == 4 and all(isinstance(m, LoraQuantLinear) for m in layers.values())
    frozen = {n: t.clone() for n, t in peft_model.state_dict().items() if "lora_" not in n}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = peft_model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in frozen.items())
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in layers.values())


def test_iec_maps_pool_and_tile():
    P = pool_matrix(6, 3)
    torch.testing.assert_close(P @ torch.arange(6.0), torch.tensor([0.5, 2.5, 4.5]))
    U = repeat_matrix(5, 2)
    torch.testing.assert_close(U @ torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0]))
