"""Writing a model made from checkpoints the way the checkpoints were written: one ``.safetensors`` file
for checkpoint files, or a Hugging Face folder (sharded like the last input, its configs copied, so
``from_pretrained`` loads it). Used by ``twa average`` and ``twa fit``.

The output is staged in a temporary beside the target and moved into place only once complete, so a
failed or interrupted command leaves no half-written model (and never touches the inputs)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoints import HF_WEIGHT_FILES, remove_stale_temporaries, temporary_prefix

INDEX_FILE = "model.safetensors.index.json"
# Files of a run's folder that describe its progress, not the model: not copied into a merged model.
RUN_STATE_FILES = ("trainer_state.json",)


def hf_weights_file(path: str) -> str | None:
    """The weights file a Hugging Face checkpoint folder keeps, or None for anything else."""
    if not os.path.isdir(path):
        return None
    return next((name for name in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, name))), None)


def output_groups(like: str, keys: Sequence[str]) -> tuple[list[tuple[str, list[str]]], str | None]:
    """(file name, keys) per output file, and the index file name when the output is sharded: sharded
    like ``like`` when it is a sharded Hugging Face folder, one ``model.safetensors`` otherwise."""
    weights_file = hf_weights_file(like)
    if weights_file is not None and weights_file.endswith(".index.json"):
        with open(os.path.join(like, weights_file)) as f:
            weight_map = json.load(f)["weight_map"]
        shards: dict[str, list[str]] = {}
        for key in keys:
            name = weight_map.get(key, "model-extra.safetensors")
            shards.setdefault(os.path.splitext(name)[0] + ".safetensors", []).append(key)
        return sorted(shards.items()), INDEX_FILE
    return [("model.safetensors", list(keys))], None


def check_new_output(out: str, folder: bool, what: str = "model") -> None:
    """Refuse, before any work, an output ``write_model`` could not write: an existing path for a
    folder, a name that is not ``.safetensors`` for a file."""
    if folder and os.path.exists(out):
        raise ValueError(f"{out} exists: give a new folder for the {what}")
    if not folder and not out.endswith(".safetensors"):
        raise ValueError(f"the {what} of checkpoint files is written as a .safetensors file, not {out}")


def _copy_configs(source: str, staging: str) -> None:
    """Config, tokenizer and generation config of ``source`` (not its weights, index or run state)."""
    for name in os.listdir(source):
        src = os.path.join(source, name)
        if os.path.isfile(src) and name.endswith((".json", ".txt", ".model", ".py")) \
                and "index" not in name and name not in RUN_STATE_FILES:
            shutil.copy2(src, os.path.join(staging, name))


def write_model(out: str, keys: Sequence[str], tensor: Callable[[str], torch.Tensor], like: str | None,
                desc: str = "writing", progress: bool | None = None) -> None:
    """Write ``tensor(key)`` for every key to ``out``: a Hugging Face folder sharded like the folder
    ``like`` (its configs copied), or, with ``like=None``, the one ``.safetensors`` file ``out``.
    Tensors are made one at a time and a shard is held only until it is written."""
    out = os.fspath(out)
    check_new_output(out, folder=like is not None)
    folder = os.path.dirname(os.path.abspath(out)) or "."
    if like is not None:
        groups, index_name = output_groups(like, keys)
    else:
        groups, index_name = [(os.path.basename(out), list(keys))], None
    remove_stale_temporaries(folder)
    staging = tempfile.mkdtemp(prefix=temporary_prefix(), dir=folder)
    try:
        weight_map = {}
        with tqdm(total=len(keys), desc=desc, unit="tensor", disable=None if progress is None else not progress) as bar:
            for file_name, group in groups:
                tensors = {}
                for k in group:
                    tensors[k] = tensor(k).contiguous()
                    weight_map[k] = file_name
                    bar.update(1)
                save_file(tensors, os.path.join(staging, file_name), metadata={"format": "pt"})
                del tensors
        if like is None:
            os.replace(os.path.join(staging, groups[0][0]), out)
            shutil.rmtree(staging)
            return
        if index_name is not None:
            with open(os.path.join(staging, index_name), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        _copy_configs(like, staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
