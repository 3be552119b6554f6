"""Loading models as TransformerLens 4 bridges with the hooks ctlens needs.

`load_model` accepts a zoo name (``"zoo:tiny-gpt2"``), a local HuggingFace model directory,
an HF ``nn.Module`` or a hub name, and returns a `TransformerBridge` that

- runs in *compatibility mode without weight processing*: hook names and pre-norm hook
  semantics of TransformerLens, logits equal to the HF module's, parameters left in HF
  coordinates (what fine-tuning and saving need);
- fires the per-head hooks the edge graph reads: ``attn.hook_result`` (per-head outputs),
  ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` (per-head residual inputs) and
  ``hook_mlp_in``;
- is in eval mode, on the requested device and dtype.

Architectures whose edges cannot be scored exactly are refused with the reason: post-norm
blocks (the residual stream is normalised after each sum, so a receiver's input is not the
sum of sender outputs) and blocks that normalise a component's output before adding it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctlens.bridge.families import (
    APPROXIMATIONS,
    FROZEN_NORM,
    FROZEN_NORM_HOOKS,
    HALF_PRECISION_FAILS,
    REFUSED,
    REQUIRED_HOOKS,
    SUPPORTED,
    architecture,
)
from ctlens.files import WEIGHTS_INDEX, safetensors_header, weight_files
from ctlens.model_source import ZOO_PREFIX, check_hub, hub_reachable, source_kind
from ctlens.model_source import HubUnreachableError as HubUnreachableError  # its old home
from ctlens.types import COMPUTE_DTYPES, DEVICE_TYPES


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be analysed exactly by ctlens; the message says why."""



def load_model(
    source: str | Path | nn.Module,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any | None = None,
    approximate: str | None = None,
) -> Any:
    """Load a model as a hooked `TransformerBridge` ready for attribution and tuning.

    Args:
        source: ``"zoo:NAME"`` (a model shipped with ctlens, see `ctlens.zoo.names`), a
            local HuggingFace model directory, an HF ``PreTrainedModel`` instance, or a hub
            name such as ``"gpt2"`` (needs network access).
        device: where to put the model (default: CPU).
        dtype: parameter dtype, e.g. ``torch.bfloat16`` or ``"float16"`` (default: keep).
            Half precision works (scores are accumulated in float32); expect scores to
            differ from float32 ones by about a percent (docs/attribution.md).
        tokenizer: a tokenizer to attach (default: the one shipped with the model).
        approximate: ``"frozen-norm"`` opts into the frozen-norm linearisation for
            architectures that normalise sublayer outputs (Gemma 2, Gemma 3, OLMo-2);
            refused for every other architecture, which ctlens analyses exactly.

    Returns:
        A `TransformerBridge` in eval mode with ctlens's hooks enabled.
    """
    torch_dtype = parse_dtype(dtype)
    _check_device(device)
    if approximate is not None and approximate not in APPROXIMATIONS:
        raise ValueError(
            f"unknown approximation {approximate!r}; the only one is 'frozen-norm' (for Gemma "
            "2/3 and OLMo-2), or None for exact analysis"
        )
    options = (device, torch_dtype, approximate)
    if isinstance(source, nn.Module):
        return _wrap(source, tokenizer, *options)
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"load_model takes a zoo name, a directory, an HF module or a hub name; "
            f"got {type(source).__name__}"
        )
    text = str(source)
    kind = source_kind(text)  # the same reading as the command line's checks
    if kind == "zoo":
        from ctlens.zoo import load_hf

        module, zoo_tokenizer = load_hf(text[len(ZOO_PREFIX) :])
        return _wrap(module, tokenizer or zoo_tokenizer, *options, name=text)
    if kind == "directory":
        path = Path(text).expanduser()
        return _wrap(*_load_directory(path, tokenizer), *options, name=str(path))
    return _boot_hub(text, tokenizer, *options)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` (a ``torch.dtype`` or its name) if ctlens computes in it (`COMPUTE_DTYPES`),
    else a ``ValueError`` naming the ones it does (`ctlens.plan` checks with it too)."""
    if dtype is None:
        return None
    value = dtype if isinstance(dtype, torch.dtype) else getattr(
        torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    name = str(value).removeprefix("torch.")
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, the dtypes ctlens computes in, "
            f"not {name} (float8 and integer weights need scales the bridge does not apply); "
            "load the model in bfloat16 or float32"
        )
    return value


def _check_device(device: str | torch.device | None) -> None:
    """Refuse a device that does not exist here, before any weights move."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from err
    if kind == "cuda" and not torch.cuda.is_available():
        why = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(
            f"device {str(device)!r} was requested but CUDA is not available (torch "
            f"{torch.__version__} {why}); use device='cpu'"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} was requested but MPS is not available")
    if kind not in DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r}: ctlens runs on {', '.join(DEVICE_TYPES)}, "
                         f"not on {kind} devices; use device='cpu' or 'cuda'")


def checkarchitecture(module: nn.Module, approximate: str | None = None) -> str:
    """Return the HF architecture name, or raise `UnsupportedModelError` with the reason."""
    arch = architecture(module)
    if arch in FROZEN_NORM and approximate == "frozen-norm":
        return arch
    if approximate is not None:
        raise UnsupportedModelError(
            f"approximate={approximate!r} applies to {', '.join(FROZEN_NORM.values())} only; "
            f"{arch} is analysed exactly: drop the option"
            if arch in SUPPORTED
            else f"{arch} cannot be analysed under approximate={approximate!r}: "
            + REFUSED.get(arch, "it is not a supported architecture")
        )
    if arch in REFUSED:
        raise UnsupportedModelError(f"{arch} cannot be analysed exactly: {REFUSED[arch]}")
    if arch not in SUPPORTED:
        raise UnsupportedModelError(f"{arch} is not supported: {_diagnose(module)}")
    return arch


def _load_directory(path: Path, tokenizer: Any | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / WEIGHTS_INDEX).is_file() or any(path.glob("*.safetensors")):
        # a missing shard or a cut file is named here, not re-initialised by transformers
        # or reported in safetensors' parser terms
        for file in weight_files(path):
            safetensors_header(file)
    module = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    return module, tokenizer


def _boot_hub(
    name: str,
    tokenizer: Any,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    approximate: str | None,
) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    check_hub(name, reachable=lambda: hub_reachable())  # looked up here: tests replace it
    try:
        bridge = TransformerBridge.boot_transformers(
            name, device=device, dtype=dtype or torch.float32, tokenizer=tokenizer
        )
    except OSError as err:
        raise OSError(
            f"could not load {name!r} from the HuggingFace Hub ({err}). Offline? Use a zoo "
            "model ('zoo:tiny-gpt2'), a local directory, or an HF module you built."
        ) from err
    checkarchitecture(bridge.original_model, approximate)
    return _configure(bridge, approximate)


def _wrap(
    module: nn.Module,
    tokenizer: Any | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    approximate: str | None,
    name: str = "external",
) -> Any:
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    arch = checkarchitecture(module, approximate)
    module.eval()
    if dtype is not None:
        module.to(dtype)
    if device is not None:
        module.to(device)
    bridge = build_bridge_from_module(
        module, arch, hf_config=module.config, tokenizer=tokenizer, model_name=name
    )
    return _configure(bridge, approximate)


def _enable_hooks(bridge: Any) -> None:
    """Compatibility mode without weight processing, plus the split hooks ctlens reads."""
    bridge.enable_compatibility_mode(no_processing=True)
    bridge.set_use_attn_result(True)
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_hook_mlp_in(True)


def _configure(bridge: Any, approximate: str | None = None) -> Any:
    """Switch on the hooks ctlens reads and check that they fire."""
    arch = architecture(bridge.original_model)
    try:
        _enable_hooks(bridge)
    except (NotImplementedError, ValueError) as err:
        raise UnsupportedModelError(
            f"{arch} cannot be analysed exactly: its TransformerLens bridge cannot expose "
            f"per-head outputs and split q/k/v inputs ({err})"
        ) from err
    bridge.eval()
    required = REQUIRED_HOOKS + (FROZEN_NORM_HOOKS if approximate else ())
    missing = [h for h in required if h not in bridge.hook_dict]
    if missing:
        raise UnsupportedModelError(
            f"{arch}: this bridge does not expose {missing}: ctlens needs per-head outputs "
            "and split q/k/v inputs to score edges"
            + (" and the post-sublayer norms' hooks for frozen-norm" if approximate else "")
        )
    dtype = next(bridge.parameters()).dtype
    if arch in HALF_PRECISION_FAILS and dtype in (torch.float16, torch.bfloat16):
        raise UnsupportedModelError(
            f"{arch} in {str(dtype).replace('torch.', '')}: TransformerLens 4.3's bridge for it "
            "fails in half precision (its attention mixes float32 and half-precision "
            "tensors); load it in float32: load_model(..., dtype='float32')"
        )
    bridge._ctlens_approximate = approximate
    return bridge


def _diagnose(module: nn.Module) -> str:
    """Why an architecture that is neither supported nor refused cannot be used: the first
    structural requirement it misses (a bridge, the split hooks, a residual stream that is
    a plain sum), or that it meets them but is untested."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    arch = architecture(module)
    known = ", ".join(sorted(SUPPORTED))
    tail = f" Supported architectures: {known}."
    config = getattr(module, "config", None)
    if config is None:
        return (
            "ctlens needs a pre-norm decoder (an HF PreTrainedModel with a config) whose "
            f"residual stream is a plain sum of component outputs.{tail}"
        )
    try:
        bridge = build_bridge_from_module(copy.deepcopy(module), arch, hf_config=config)
    except Exception as err:  # noqa: BLE001 - any failure means: no bridge for it
        return f"TransformerLens 4.3 has no bridge for it ({type(err).__name__}: {err}).{tail}"
    try:
        _enable_hooks(bridge)
    except (NotImplementedError, ValueError) as err:
        return f"its bridge cannot expose per-head outputs and split q/k/v inputs ({err}).{tail}"
    missing = [h for h in REQUIRED_HOOKS if h not in bridge.hook_dict]
    if missing:
        return f"its bridge does not expose the hooks {missing}.{tail}"
    return (
        "its bridge exposes every hook ctlens reads, but the family has not been checked end "
        "to end (gradients, exact patching, parameter rules, export; tests/test_families.py "
        f"shows how).{tail}"
    )
