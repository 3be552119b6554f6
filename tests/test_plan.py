"""Real model shapes on the meta device, and the memory planner (ctlens.plan)."""

from __future__ import annotations

import pytest
import torch

from ctlens import real_shapes

# Parameter counts of the real checkpoints (tied embeddings counted once).
PUBLISHED = {
    "gpt2": 124_439_808,
    "pythia-160m": 162_322_944,
    "pythia-1b": 1_011_781_632,
    "qwen2.5-0.5b": 494_032_768,
    "gemma-2-2b": 2_614_341_888,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "olmo-2-1b": 1_484_916_736,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_shape_builds_on_meta_with_published_count(name: str) -> None:
    module = real_shapes.build(name)
    assert all(p.device.type == "meta" for p in module.parameters())
    n = real_shapes.count_parameters(module)
    assert n == PUBLISHED[name]
    assert abs(n / real_shapes.shape(name).params - 1) < 0.01


def test_real_shape_lookup() -> None:
    assert real_shapes.names() == list(real_shapes.SHAPES)
    assert set(real_shapes.names()) == set(PUBLISHED)
    assert real_shapes.shape("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert real_shapes.build("gpt2", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="known: gpt2"):
        real_shapes.shape("gpt-5")
