"""Tests of ctlens.model: loading, logits parity with HF, dtypes, devices and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    VOCAB,
    random_task,
    tiny_gpt2_module,
    tiny_llama_module,
    tiny_neox_module,
)
from transformers import (
    GPTJConfig,
    GPTJForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

import ctlens
from ctlens.model import UnsupportedModelError

TOKENS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 40, 49, 0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_equal_hf_module(tiny_module, family, dtype):
    module = tiny_module.to(dtype)
    with torch.no_grad():
        expected = module(TOKENS).logits
        model = ctlens.load_model(copy.deepcopy(module))
        got = model(TOKENS)
    assert got.dtype == dtype
    # HF Llama computes RMSNorm and its rotary tables in float32 even for float64 models
    tol = 1e-5 if dtype == torch.float32 else (1e-10 if family == "gpt2" else 1e-6)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_loaded_model_is_configured(tiny_model):
    assert not tiny_model.training
    cfg = tiny_model.cfg
    assert cfg.use_attn_result and cfg.use_split_qkv_input and cfg.use_hook_mlp_in
    for name in (
        "blocks.1.attn.hook_result",
        "blocks.1.hook_q_input",
        "blocks.1.hook_v_input",
        "blocks.1.hook_mlp_in",
        "hook_embed",
        "ln_final.hook_in",
    ):
        assert name in tiny_model.hook_dict
    seen = []
    tiny_model.run_with_hooks(
        TOKENS, fwd_hooks=[("blocks.0.attn.hook_result", lambda x, hook: seen.append(x.shape))]
    )
    assert seen == [(2, 6, 4, 32)]


def test_local_directory_loads(tmp_path):
    module = tiny_llama_module()
    module.save_pretrained(tmp_path / "llama")
    model = ctlens.load_model(tmp_path / "llama")
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), module(TOKENS).logits, rtol=1e-5, atol=1e-5)
    model = ctlens.load_model(str(tmp_path / "llama"), dtype="float64")
    assert next(model.parameters()).dtype == torch.float64


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory.*zoo name"):
        ctlens.load_model(str(tmp_path / "missing.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        ctlens.load_model(tmp_path / "empty")
    with pytest.raises(TypeError, match="got int"):
        ctlens.load_model(3)
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        ctlens.load_model(tiny_gpt2_module(), dtype="float7")


def test_post_norm_architecture_is_refused():
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=16,
            word_embed_proj_dim=16,
        )
    )
    opt.config.architectures = ["OPTForCausalLM"]
    with pytest.raises(
        UnsupportedModelError, match="OPTForCausalLM cannot be analysed exactly.*post-norm"
    ):
        ctlens.load_model(opt)


def test_unknown_architecture_is_refused():
    with pytest.raises(
        UnsupportedModelError, match="Linear is not supported.*pre-norm decoder.*Supported"
    ):
        ctlens.load_model(torch.nn.Linear(2, 2))


def test_bridge_without_split_hooks_is_refused():
    """GPT-J's bridge has no per-head result hook: refused with the bridge's reason."""
    torch.manual_seed(0)
    gptj = GPTJForCausalLM(
        GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, rotary_dim=4)
    )
    with pytest.raises(UnsupportedModelError, match="GPTJ.*cannot be analysed exactly.*per-head"):
        ctlens.load_model(gptj)


def test_parallel_block_model_uses_parallel_validity():
    model = ctlens.load_model(tiny_neox_module(parallel=True))
    graph = ctlens.Graph.from_model(model)
    assert graph.spec.parallel_attn_mlp and graph.n_edges == 110 - 2 * 4
    sequential = ctlens.Graph.from_model(ctlens.load_model(tiny_neox_module(parallel=False)))
    assert not sequential.spec.parallel_attn_mlp and sequential.n_edges == 110


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_half_precision_attributes_with_fp32_scores(dtype):
    data = random_task()
    reference = ctlens.attribute(ctlens.load_model(tiny_gpt2_module()), data, progress=False).scores
    model = ctlens.load_model(tiny_gpt2_module(), dtype=dtype)
    assert next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    scores = ctlens.attribute(model, data, progress=False)
    assert scores.scores.dtype == torch.float32 and torch.isfinite(scores.scores).all()
    valid = scores.graph.valid
    corr = torch.corrcoef(torch.stack([scores.scores[valid], reference[valid]]))[0, 1]
    assert corr > 0.99
    assert torch.isfinite(torch.tensor(scores.metadata["metric_clean"]))


def test_hub_name_offline_fails_at_once_suggesting_zoo(monkeypatch):
    """A hub name with no network: one line suggesting zoo:NAME, and no download attempt
    (HF_HUB_OFFLINE unset; the reachability check is replaced, so no real network)."""
    from transformer_lens.model_bridge import TransformerBridge

    import ctlens.model as model_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_module, "hub_reachable", lambda timeout=3.0: False)

    def no_download(*args, **kwargs):
        raise AssertionError("boot_transformers must not be called offline")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", no_download)
    with pytest.raises(OSError, match="cannot be reached.*did you mean 'zoo:tiny-gpt2'") as err:
        ctlens.load_model("tiny-gpt2")
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI reports ValueErrors in one line
    with pytest.raises(OSError, match="use a zoo model \\('zoo:NAME'; shipped: .*tiny-gpt2"):
        ctlens.load_model("some-org/unknown-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_module, "hub_reachable", no_download)
    with pytest.raises(OSError, match="cannot be reached"):
        ctlens.load_model("gpt2")


def test_hub_reachable_is_false_when_no_connection_opens(monkeypatch):
    import socket

    from ctlens.model import hub_reachable

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub_reachable(timeout=0.1) is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda' was requested but CUDA is not available"):
        ctlens.load_model(tiny_gpt2_module(), device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        ctlens.load_model(tiny_gpt2_module(), device="gpu0")


def test_unknown_architecture_names_what_is_missing():
    """An architecture that is neither supported nor refused: the message says which hook
    or which structural requirement is missing."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM is not supported: ") as err:
        ctlens.load_model(bloom)
    message = str(err.value)
    # Bloom's bridge has every hook; what it lacks is the end-to-end check
    assert "exposes every hook ctlens reads, but the family has not been checked" in message
    assert "Supported architectures: GPT2LMHeadModel" in message
