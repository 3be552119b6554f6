"""GPT-2's fused q/k/v made shardable (`ctlens.tuning.parallel.fused`), on one process."""

from __future__ import annotations

import pytest
import torch
from tuning_toy import tiny_model

from ctlens.tuning import weights as W
from ctlens.tuning.parallel.fused import fused_layers, refused, unfuse


def test_unfuse_keeps_the_function_and_refused_restores_the_layout() -> None:
    model = tiny_model("gpt2")
    tokens = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    before_logits = model(tokens)
    before = {k: v.detach().clone() for k, v in W.hf_state_dict(model).items()}
    count = W.count_real_parameters(model)
    names = [n for n, _ in model.named_parameters()]
    unfused = unfuse(model)
    assert len(unfused.layers) == model.cfg.n_layers and not fused_layers(model)
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any(n.endswith("qkv._original_component.weight")
                   for n, _ in model.named_parameters())
    # the same function (the kernels differ: strided vs contiguous weights)
    torch.testing.assert_close(model(tokens), before_logits, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # a step moves the own-storage parts
        model.blocks[0].attn.k.original_component.weight[1, 2] += 1.0
    with refused(unfused):
        assert [n for n, _ in model.named_parameters()] == names
        assert W.count_real_parameters(model) == count
        after = W.hf_state_dict(model)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed == ["transformer.h.0.attn.c_attn.weight"]
        assert after[changed[0]][2, 32 + 1] == before[changed[0]][2, 32 + 1] + 1.0
        refused_logits = model(tokens)
    assert not fused_layers(model)
    torch.testing.assert_close(model(tokens), refused_logits, atol=1e-6, rtol=1e-5)


def test_optimizer_state_order_round_trips() -> None:
    model = tiny_model("gpt2")
    fused_params = [p for p in model.parameters() if p.requires_grad]
    unfused = unfuse(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(fused_params) - len(params) == 2 * model.cfg.n_layers == len(unfused.slots)
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    as_fused = unfused.to_fused_order(saved)
    plain = torch.optim.AdamW(fused_params)  # an unsharded run's optimizer loads it
    plain.load_state_dict(as_fused)
    for slot in unfused.slots:
        assert slot not in as_fused["state"]
    back = unfused.from_fused_order(as_fused)
    assert back["param_groups"] == saved["param_groups"]
    for i, entry in saved["state"].items():
        assert all(torch.equal(v, back["state"][i][k]) for k, v in entry.items())
    as_fused["state"][unfused.slots[0]] = {"step": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="fused c_attn parameters"):
        unfused.from_fused_order(as_fused)
