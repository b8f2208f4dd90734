"""What `--model` names, read without its weights: a preset, the embedded SmolLM2, a transformers
directory (dense or 4-bit) or a GGUF file. Only the config (and the tokenizer, which the data needs)
is read, so a plan of a 70B checkpoint touches a few kilobytes of it.

The errors are finetune's (fourbit.train.models.load_dense): a path that is not a model is refused
in one line naming what was expected, before anything is built.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import InvalidInput
from ..train.model_files import gguf_errors, loading, read_config
from ..train.models import EMBEDDED, check_4bit, check_gguf, smollm2_dir, stored_quantization
from .presets import PRESETS, is_preset, preset_config

__all__ = ["ModelSource", "resolve"]


@dataclasses.dataclass
class ModelSource:
    name: str  # what --model said
    hf_config: object  # a transformers PretrainedConfig
    tokenizer: object | None  # None for a preset: batches are then max_length tokens long
    stored: dict | None  # the quantization_config of a 4-bit directory
    preset: bool


_FIX = (f"give a preset ({', '.join(PRESETS)}), {EMBEDDED!r} (the embedded SmolLM2), a transformers model "
        "directory, or a .gguf file")


def resolve(spec: str, *, layers: int | None = None) -> ModelSource:
    """The ModelSource of `spec`; InvalidInput for anything else. `layers` shortens a preset."""
    from transformers import AutoConfig, AutoTokenizer

    if is_preset(spec):
        return ModelSource(spec, preset_config(spec, layers=layers), None, None, True)
    path = smollm2_dir() if spec == EMBEDDED else spec
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InvalidInput(f"{spec!r} is a directory without config.json: not a transformers model directory", _FIX)
        read_config(path)  # a JSON object, as finetune's load checks it
        stored = stored_quantization(path)
        if stored is not None:  # an 8-bit or other checkpoint is refused before its config is planned
            check_4bit(path, stored)
        try:
            with loading(path):
                config = AutoConfig.from_pretrained(path)
        except (ValueError, OSError, KeyError) as err:
            raise InvalidInput(f"{spec!r} has a config.json transformers cannot read ({str(err).splitlines()[0]})", _FIX) from None
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif os.path.isfile(path):
        check_gguf(path, _FIX)
        folder, name = os.path.split(os.path.abspath(path))
        with gguf_errors(path):
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        stored = None
    else:
        raise InvalidInput(f"model {spec!r} is neither a preset, {EMBEDDED!r}, an existing directory, nor an existing file", _FIX)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelSource(spec, config, tokenizer, stored, False)
