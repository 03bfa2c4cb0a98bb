"""Tiny random-weight transformers models of several architectures, built from configs."""

from __future__ import annotations

import torch
import transformers

# Dimensions chosen so 64-wide groups leave a short last group somewhere (hidden 96 = 64 + 32).
COMMON = dict(
    vocab_size=128,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

CONFIGS = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(COMMON, tie_word_embeddings=True),
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, COMMON),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, COMMON),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(COMMON, head_dim=24)),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(vocab_size=128, n_embd=96, n_layer=2, n_head=4, n_positions=128),
    ),
    "bert": (
        transformers.BertConfig,
        transformers.BertModel,
        dict(
            vocab_size=128,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        ),
    ),
}


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, kwargs = CONFIGS[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def tiny_tokenizer(text: str, vocab_size: int = 128):
    """A BPE tokenizer trained on `text`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_checkpoint(path, model=None):
    """Save a tiny model (default: Llama) and a tokenizer as an ordinary transformers folder."""
    from loquant.data import load_text

    model = model if model is not None else tiny_model("llama")
    model.save_pretrained(path)
    tiny_tokenizer(load_text("sotu-calib")[:50000], model.config.vocab_size).save_pretrained(path)
    return path
