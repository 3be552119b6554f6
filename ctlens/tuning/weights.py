"""The bridge's weights in HuggingFace names: mapping, counting, saving, exporting.

A TransformerBridge wraps the HF module *in place* (DESIGN.md, TransformerLens 4 facts): the
module's parameter names gain ``_original_component`` segments, the bridge adds aliases
(``attn.q`` / ``attn.k`` / ``attn.v`` are strided views of GPT-2's fused ``attn.c_attn``;
``attn.qkv``, ``attn.o``, ``mlp.in`` ... alias real HF modules), and ``bridge.state_dict()``
uses TransformerLens names. None of that is a loadable HF checkpoint.

The mapping here is deliberate and checked: a fresh HF module of the same class and config
(built on the meta device, no memory, no RNG use) gives the exact HF key set; each key is
found among the bridge's parameter and buffer names with ``._original_component`` removed;
every real storage of the bridge's parameters must be covered by a mapped key, otherwise
`hf_state_dict` raises (a silently dropped parameter would make exports lossy).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ctlens.bridge.families import split_copies
from ctlens.outputs import replace_dir, staging_dir

_SEGMENT = re.compile(r"\._original_component(?=\.|$)")


class CheckpointMismatchError(ValueError):
    """Saved weights do not fit the model (different architecture, size or names)."""


def hf_module(model: Any) -> torch.nn.Module:
    """The HF module a bridge wraps (``model`` itself if it is a plain HF module)."""
    return getattr(model, "original_model", model)


def _fresh_keys(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """HF state-dict keys and shapes of a fresh module of the same class and config."""
    with torch.device("meta"):
        fresh = type(module)(module.config)
    return {k: tuple(v.shape) for k, v in fresh.state_dict().items()}


def hf_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Live tensors of ``model`` under their HF state-dict names (tied weights appear twice).

    The tensors are the model's own (no copy): views for reading or for in-place copies.
    Raises if a fresh HF key has no tensor, a shape differs, or a real parameter storage of
    the model is not reachable through the mapped keys.
    """
    module = hf_module(model)
    copies = split_copies(model)
    for copy in copies:  # GPT-NeoX's fused qkv is stale until its q/k/v copies are written back
        copy.gather()
    copied = {_storage_key(p) for c in copies for p in c.parts}
    expected = _fresh_keys(module)
    found: dict[str, torch.Tensor] = {}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        key = _SEGMENT.sub("", name)
        if key in expected and key not in found:
            found[key] = tensor
    missing = [k for k in expected if k not in found]
    if missing:
        raise RuntimeError(
            f"cannot map the model's weights to HF names: no tensor for {missing[:5]} "
            f"({len(missing)} missing). The bridge layout changed; update ctlens.tuning.weights"
        )
    for key, shape in expected.items():
        if tuple(found[key].shape) != shape:
            raise RuntimeError(f"{key}: bridge tensor {tuple(found[key].shape)} vs HF {shape}")
    covered = {_storage_key(t) for t in found.values()}
    for name, param in module.named_parameters(remove_duplicate=False):
        if _storage_key(param) not in covered | copied:
            raise RuntimeError(
                f"parameter {name} is not covered by any HF key; exporting would lose it"
            )
    return {k: found[k] for k in expected}


def unique_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """`hf_state_dict` with tied duplicates dropped (the first name of each storage kept)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state_dict(model).items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in seen:
            seen.add(ident)
            out[key] = tensor
    return out


def hf_name(name: str) -> str:
    """A bridge-wrapped module's parameter name as HF spells it (no ``_original_component``)."""
    return _SEGMENT.sub("", name)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def real_parameters(model: Any) -> list[torch.Tensor]:
    """One flat tensor per distinct parameter storage (views and tied weights counted once).

    Each covers the span of its storage that parameters use, so padding around them (FSDP2's
    gathered parameters) is not counted.
    """
    spans: dict[int, tuple[torch.Tensor, int, int]] = {}
    for p in model.parameters():
        key = _storage_key(p)
        lo = p.storage_offset()
        hi = lo + sum((n - 1) * st for n, st in zip(p.shape, p.stride(), strict=True)) + 1
        if key in spans:
            first, old_lo, old_hi = spans[key]
            lo, hi = min(lo, old_lo), max(hi, old_hi)
        else:
            first = p
        spans[key] = (first, lo, hi)
    flats = []
    for first, lo, hi in spans.values():
        flat = torch.empty(0, dtype=first.dtype, device=first.device)
        flat.set_(first.untyped_storage(), lo, (hi - lo,))
        flats.append(flat)
    return flats


def count_real_parameters(model: Any) -> int:
    """Number of real parameters (GPT-2's q/k/v views and tied embeddings counted once)."""
    return sum(t.numel() for t in real_parameters(model))


def snapshot(model: Any) -> list[torch.Tensor]:
    """Detached CPU copies of `real_parameters` (for `moved_fraction`)."""
    return [t.detach().to("cpu", copy=True) for t in real_parameters(model)]


def moved_fraction(model: Any, start: list[torch.Tensor]) -> float:
    """Fraction of real parameters that differ (bitwise) from ``start``."""
    now = real_parameters(model)
    if len(now) != len(start):
        raise ValueError("the snapshot does not belong to this model (storage count differs)")
    moved = sum(int((a.detach().cpu() != b).sum()) for a, b in zip(now, start, strict=True))
    total = sum(t.numel() for t in start)
    return moved / max(1, total)


# ---------------------------------------------------------------------- files


def save_weights(model: Any, path: Path) -> None:
    """Write the model's HF-named, de-duplicated weights to a safetensors file."""
    tensors = {
        k: v.detach().contiguous().clone().cpu() for k, v in unique_state_dict(model).items()
    }
    from ctlens.tuning import rundir

    rundir.write_bytes(Path(path), save(tensors))


def check_weights(model: Any, path: Path) -> None:
    """Raise `CheckpointMismatchError` unless ``path`` holds weights that fit ``model``."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointMismatchError(f"{path} is missing: the checkpoint is incomplete")
    with safe_open(str(path), framework="pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    compare_shapes(path, shapes, unique_state_dict(model))


def compare_shapes(
    path: Path, shapes: dict[str, tuple[int, ...]], target: dict[str, torch.Tensor]
) -> None:
    if set(shapes) != set(target):
        extra = sorted(set(shapes) - set(target))[:3]
        missing = sorted(set(target) - set(shapes))[:3]
        raise CheckpointMismatchError(
            f"{path} does not match this model: unexpected {extra}, missing {missing}"
        )
    for k, shape in shapes.items():
        if shape != tuple(target[k].shape):
            raise CheckpointMismatchError(
                f"{path} does not match this model: {k} is {shape} in the file but "
                f"{tuple(target[k].shape)} in the model"
            )


@torch.no_grad()
def load_weights(model: Any, path: Path) -> None:
    """Copy weights written by `save_weights` into ``model`` in place.

    Raises `CheckpointMismatchError` (and changes nothing) when names or shapes differ.
    """
    saved = load_file(str(path))
    target = unique_state_dict(model)
    compare_shapes(path, {k: tuple(v.shape) for k, v in saved.items()}, target)
    for key, tensor in target.items():
        tensor.copy_(saved[key])
    for copy in split_copies(model):
        copy.scatter()


def plain_hf_copy(model: Any, device: str | torch.device | None = None) -> torch.nn.Module:
    """A fresh, unwrapped HF module holding a copy of the bridge's current weights.

    Built on the meta device and filled from `hf_state_dict` (contiguous copies, on
    ``device`` if given), with tied embeddings re-tied; in eval mode. Used to export and to
    wrap a model in LoRA without touching the bridge.
    """
    source = hf_module(model)
    state = {
        k: v.detach().contiguous().clone().to(device or v.device)
        for k, v in hf_state_dict(model).items()
    }
    with torch.device("meta"):
        fresh = type(source)(source.config)
    fresh.load_state_dict(state, strict=True, assign=True)
    _fill_buffers(fresh, source, device)
    if getattr(source.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.eval()


def _fill_buffers(fresh: torch.nn.Module, source: torch.nn.Module,
                  device: str | torch.device | None) -> None:
    """Copy the buffers a state dict leaves on the meta device (non-persistent ones, such as
    Llama's rotary ``inv_freq``) from ``source``, whose module names may carry the bridge's
    ``_original_component`` wrappers."""
    buffers = {hf_name(n): b for n, b in source.named_buffers()}
    for name, buffer in list(fresh.named_buffers()):
        if not buffer.is_meta:
            continue
        if name not in buffers:
            raise RuntimeError(f"cannot copy the model: its buffer {name} has no counterpart "
                               "in the bridge's HF module")
        owner, _, leaf = name.rpartition(".")
        module = fresh.get_submodule(owner)
        original = buffers[name]
        module.register_buffer(leaf, original.detach().clone().to(device or original.device),
                               persistent=leaf not in module._non_persistent_buffers_set)


def export_hf(model: Any, out_dir: str | Path, tokenizer: Any | None = None) -> Path:
    """Write ``model`` as a plain HF model directory (``save_pretrained``), atomically.

    The result loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and with
    `ctlens.load_model`. An existing directory at ``out_dir`` is replaced only once the new
    one is complete.
    """
    out = Path(out_dir)
    fresh = plain_hf_copy(model, device="cpu")
    tmp = staging_dir(out)
    try:
        with _no_hf_progress_bar():  # one small shard: its bar only broke the tuner's lines
            fresh.save_pretrained(tmp, safe_serialization=True)
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _no_hf_progress_bar() -> Iterator[None]:
    """transformers' progress bars off inside the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
