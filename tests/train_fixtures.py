"""A tiny random Llama with SmolLM2's tokenizer: a real transformers directory that trains in seconds."""

from __future__ import annotations

import os

import torch


def tiny_llama_dir(root: str) -> str:
    """Write a 2-layer, 64-wide Llama (random init, seed 0) + the SmolLM2 tokenizer into root/tiny."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fourbit.train.models import smollm2_dir

    path = os.path.join(root, "tiny")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
