"""Architectures a plan can be made for without any file: the published dimensions of each model.

A preset is a transformers config built from the dimensions its authors published (the papers'
tables and the config.json of the released checkpoints); nothing is downloaded and no weight
exists. The plan builds the model from it on fake tensors, so the byte counts are those of the
real architecture (tied embeddings, grouped-query attention and vocabulary included).

    name            hidden  layers  heads  kv heads  MLP     vocab    source
    llama-7b        4096    32      32     32        11008   32000    LLaMA (Touvron et al. 2023), Table 2
    llama-13b       5120    40      40     40        13824   32000
    llama-33b       6656    60      52     52        17920   32000
    llama-65b       8192    80      64     64        22016   32000
    llama-2-7b      4096    32      32     32        11008   32000    Llama 2 (Touvron et al. 2023)
    llama-2-70b     8192    80      64     8         28672   32000
    llama-3-8b      4096    32      32     8         14336   128256   Llama 3 model card / config.json
    llama-3-70b     8192    80      64     8         28672   128256
    mistral-7b      4096    32      32     8         14336   32000    Mistral 7B (Jiang et al. 2023)
    smollm2-135m    576     30      9      3         1536    49152    SmolLM2 config.json (tied embeddings)
"""

from __future__ import annotations

__all__ = ["PRESETS", "preset_config", "is_preset"]

# name -> (model_type, hidden, layers, heads, kv heads, intermediate, vocab, max positions, tied, rope theta)
PRESETS: dict[str, tuple] = {
    "llama-7b": ("llama", 4096, 32, 32, 32, 11008, 32000, 2048, False, 10000.0),
    "llama-13b": ("llama", 5120, 40, 40, 40, 13824, 32000, 2048, False, 10000.0),
    "llama-33b": ("llama", 6656, 60, 52, 52, 17920, 32000, 2048, False, 10000.0),
    "llama-65b": ("llama", 8192, 80, 64, 64, 22016, 32000, 2048, False, 10000.0),
    "llama-2-7b": ("llama", 4096, 32, 32, 32, 11008, 32000, 4096, False, 10000.0),
    "llama-2-70b": ("llama", 8192, 80, 64, 8, 28672, 32000, 4096, False, 10000.0),
    "llama-3-8b": ("llama", 4096, 32, 32, 8, 14336, 128256, 8192, False, 500000.0),
    "llama-3-70b": ("llama", 8192, 80, 64, 8, 28672, 128256, 8192, False, 500000.0),
    "mistral-7b": ("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, False, 10000.0),
    "smollm2-135m": ("llama", 576, 30, 9, 3, 1536, 49152, 8192, True, 100000.0),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def is_preset(name: str) -> bool:
    return _key(name) in PRESETS


def preset_config(name: str, *, layers: int | None = None):
    """The transformers config of preset `name` (case and '_' / '-' ignored); `layers` overrides
    the number of decoder layers (a model 'shaped like' the preset, for quick measurements)."""
    import transformers

    model_type, hidden, n_layers, heads, kv, inter, vocab, positions, tied, theta = PRESETS[_key(name)]
    cls = transformers.MistralConfig if model_type == "mistral" else transformers.LlamaConfig
    return cls(
        hidden_size=hidden, num_hidden_layers=layers or n_layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=positions, tie_word_embeddings=tied,
        rope_theta=theta, rms_norm_eps=1e-5,
    )
