import math

import torch

from loquant.evaluate import perplexity

from tiny_models import tiny_model


class Uniform(torch.nn.Module):
    """Equal logits over V tokens: the perplexity is exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.p = vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_uniform_model_has_vocab_perplexity():
    result = perplexity(Uniform(50), torch.randint(0, 50, (3, 9)), progress=False)
    assert math.isclose(result["ppl"], 50, rel_tol=1e-6)
    assert result["tokens"] == 3 * 8


def test_matches_manual_nll_and_is_batch_independent():
    model = tiny_model("llama")
    windows = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = model(input_ids=windows).logits.log_softmax(-1)[:, :-1]
    manual = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    for bs in (1, 2, 5):
        r = perplexity(model, windows, batch_size=bs, progress=False)
        assert math.isclose(r["nll"], manual, rel_tol=1e-5)
        assert math.isclose(r["ppl"], math.exp(manual), rel_tol=1e-5)
