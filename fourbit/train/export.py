"""`fourbit quantize`: a model -> a 4-bit NF4 directory that transformers + bitsandbytes load.

    <out>/model.safetensors       packed weights under bitsandbytes' keys (`<mod>.weight`, `.absmax`,
                                  `.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`)
    <out>/config.json             the model config + quantization_config (quant_method "bitsandbytes")
    <out>/tokenizer files
    <out>/fourbit-quantize.json   the marker: fourbit quantize wrote it, from which source (transformers ignores it)

Safe against a second process and against losing what is there: the output is locked (an flock on
`<parent>/.<name>.fourbit.lock`, see lock.py) from before its paths are checked until it is in place,
so a second `fourbit quantize` into the same output is refused in one line naming the holder. The
new directory is written into a temporary sibling (created first, so an unwritable place fails before
the model loads), fsync'd, and renamed into place; an existing output is moved aside first and
deleted only after the rename, so some complete copy exists at every moment. --overwrite replaces
only a directory fourbit quantize wrote (it carries the marker) or an empty one, never a symlink.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from ..errors import InvalidInput, RunExists, output_error
from .lock import Lock, make_dirs, remove_empty
from .models import EMBEDDED, load_quantized

__all__ = ["export_4bit", "MARKER"]

MARKER = "fourbit-quantize.json"


def _check_paths(spec: str, output_dir: str, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an output that is, holds or sits inside the input (with
    --overwrite it would destroy the source), that exists without --overwrite, or that --overwrite
    may not replace (not written by fourbit quantize, or a symlink)."""
    out = os.path.realpath(output_dir)
    if spec != EMBEDDED and os.path.exists(spec):
        src = os.path.realpath(spec)
        if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
            where = "is" if out == src else ("is inside" if out.startswith(src + os.sep) else "contains")
            raise InvalidInput(
                f"the output {output_dir!r} {where} the input {spec!r}; writing it would destroy the source model",
                "choose an output directory outside the input",
            )
    if not os.path.lexists(output_dir):
        return
    if not overwrite:
        raise RunExists(f"{output_dir!r} exists", "pass --overwrite to replace it, or choose another output directory")
    if os.path.islink(output_dir):
        raise InvalidInput(f"{output_dir!r} is a symlink; --overwrite would replace the link, not what it points to",
                           "give the directory itself, or another output directory")
    if not os.path.isdir(output_dir):
        raise InvalidInput(f"{output_dir!r} is a file, not a 4-bit model directory", "choose a directory path")
    if os.listdir(output_dir) and not os.path.isfile(os.path.join(output_dir, MARKER)):
        raise InvalidInput(
            f"{output_dir!r} is not a directory fourbit quantize wrote (no {MARKER}); --overwrite replaces only those",
            "choose another output directory (or remove that one yourself)",
        )


def _settle_tree(directory: str) -> None:
    """fsync every file and folder below `directory`, and give the folder the permissions the umask
    allows (mkdtemp makes it 0700)."""
    from ..nf4.files import fsync_dir

    for base, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(base)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)


def export_4bit(spec: str, output_dir: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Quantize a model to NF4 (double quant, blocksize 64) and write a directory that
    `transformers.AutoModelForCausalLM.from_pretrained(output_dir)` loads with bitsandbytes (see the
    module docstring for the layout, the lock and what --overwrite may replace). Returns output_dir."""
    output_dir = os.fspath(output_dir)
    target = os.path.abspath(output_dir)
    parent = os.path.dirname(target)
    created: list[str] = []
    try:
        created = make_dirs(parent)
        lock = Lock(os.path.join(parent, f".{os.path.basename(target)}.fourbit.lock"), what=f"the output {output_dir!r}")
        notice = lock.acquire()
    except OSError as err:
        remove_empty(created)
        raise output_error(output_dir, err) from err
    if notice:
        print(f"fourbit: {notice}", file=sys.stderr)
    try:
        _check_paths(spec, output_dir, overwrite)
        _write(spec, output_dir, parent, overwrite)
    except BaseException:
        lock.release()
        remove_empty(created)
        raise
    lock.release()
    return output_dir


def _write(spec: str, output_dir: str, parent: str, overwrite: bool) -> None:
    from ..nf4.files import fsync_dir, save_safetensors_file

    try:
        tmp = tempfile.mkdtemp(prefix=".tmp-quantize-", dir=parent)
    except OSError as err:
        raise output_error(output_dir, err) from err
    old = None
    try:
        model, tokenizer, _ = load_quantized(spec)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embedding; transformers re-ties on load
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        model.config.quantization_config = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"],
        }
        save_safetensors_file(os.path.join(tmp, "model.safetensors"), state, {"format": "pt"})
        source = spec if spec == EMBEDDED else os.path.abspath(spec)
        marker = {"written_by": "fourbit quantize", "source": source}  # no time: equal exports are equal bytes
        try:
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                f.write(json.dumps(marker, indent=1, sort_keys=True) + "\n")
            _settle_tree(tmp)
            if os.path.lexists(output_dir):
                _check_paths(spec, output_dir, overwrite)  # what appeared while the model loaded
                old = tempfile.mkdtemp(prefix=".tmp-replaced-", dir=parent)
                os.replace(output_dir, os.path.join(old, "previous"))
            os.replace(tmp, output_dir)
            fsync_dir(parent)
        except OSError as err:
            raise output_error(output_dir, err) from err
    except BaseException:
        if old is not None and not os.path.exists(output_dir):
            os.replace(os.path.join(old, "previous"), output_dir)  # put the replaced copy back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
