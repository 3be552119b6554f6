"""Shared fixtures: tiny random models of each supported family, built locally."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import ctlens

VOCAB = 50

# The tiny test models are latency-bound: on a small shared machine, intra-op threads only
# add synchronisation waits (a 2-layer forward drops from ~0.8 s to a few ms with one thread).
torch.set_num_threads(1)


def tiny_gpt2_module(
    seed: int = 0, dtype: torch.dtype = torch.float32, n_ctx: int = 16
) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with 4 heads, d_model 32, ``n_ctx`` positions, no dropout."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=n_ctx,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama_module(
    seed: int = 0, dtype: torch.dtype = torch.float32, n_kv_heads: int = 2
) -> LlamaForCausalLM:
    """A 2-layer Llama with 4 heads, d_model 32; 2 KV groups (grouped-query) by default."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_neox_module(
    parallel: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32
) -> GPTNeoXForCausalLM:
    """A 2-layer GPT-NeoX, d_model 32; parallel attention + MLP blocks by default."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        use_parallel_residual=parallel,
    )
    return GPTNeoXForCausalLM(config).to(dtype).eval()


def random_task(
    n: int = 6, seq: int = 7, seed: int = 1, metric: str = "logit_diff"
) -> ctlens.TaskData:
    """Random clean/corrupt pairs of varying length (right-padded) with random answers."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (n, seq), generator=gen)
    corrupt = torch.randint(1, VOCAB, (n, seq), generator=gen)
    lengths = torch.randint(seq - 3, seq + 1, (n,), generator=gen)
    lengths[0] = seq
    mask = torch.arange(seq)[None] < lengths[:, None]
    clean[~mask] = 0
    corrupt[~mask] = 0
    return ctlens.TaskData(
        clean=clean,
        corrupt=corrupt,
        correct=torch.randint(1, VOCAB, (n,), generator=gen),
        wrong=torch.randint(1, VOCAB, (n,), generator=gen),
        attention_mask=mask,
        metric=metric,
    )


@pytest.fixture(params=["gpt2", "llama"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_module(family: str) -> torch.nn.Module:
    """The plain HF module (float64, for exact comparisons)."""
    build = tiny_gpt2_module if family == "gpt2" else tiny_llama_module
    return build(dtype=torch.float64)


@pytest.fixture
def tiny_model(tiny_module: torch.nn.Module):
    """The same module wrapped by ctlens.load_model."""
    return ctlens.load_model(tiny_module)


@pytest.fixture
def task() -> ctlens.TaskData:
    return random_task()
