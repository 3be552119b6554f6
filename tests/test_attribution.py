"""Tests of ctlens.attribution and ctlens.bridge.hooks against independent oracles.

The oracle here, `HFReference`, never touches ctlens or TransformerLens: it runs a *separate
copy* of the plain HuggingFace module (the bridge rewires the module it wraps) with PyTorch
hooks that read sender outputs (the block-0 input, per-head ``z_h @ W_O[h]`` from the
output projection's input, MLP outputs) and add a tensor to exactly one receiver's input:

- q / k / v of head (group) ``h``: the columns of the q/k/v projection that belong to ``h``
  are recomputed from ``LN(x + e)`` (x: the block's pre-LN residual), the rest stay as is;
- MLP ``l``: ``e`` is added to the input of the pre-MLP norm only (not to the skip path);
- logits: ``e`` is added to the input of the final norm.

Receiver gradients are gradients with respect to those added tensors (zero-valued leaves),
finite differences perturb them, and "patch one edge" adds ``a_s^ref - a_s^clean`` to them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

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
    GPT2LMHeadModel,
)

import ctlens
from ctlens.attribution import mean_activations
from ctlens.bridge.hooks import frozen_parameters, receiver_hooks, sender_hooks
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.scores import EdgeScores

# ------------------------------------------------------------------------------ the oracle


class HFReference:
    """Independent sender reads and receiver perturbations on a plain HF GPT-2 / Llama."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.m = module.eval()
        cfg = module.config
        self.gpt2 = isinstance(module, GPT2LMHeadModel)
        if self.gpt2:
            self.blocks = list(module.transformer.h)
            self.final_norm = module.transformer.ln_f
            self.H, self.K, self.d = cfg.n_head, cfg.n_head, cfg.n_embd
        else:
            self.blocks = list(module.model.layers)
            self.final_norm = module.model.norm
            self.H, self.K, self.d = (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.hidden_size,
            )
        self.L, self.dh = len(self.blocks), self.d // self.H
        kv = "h" if self.K == self.H else "g"
        self.senders = ["input"]
        self.receivers: list[str] = []
        # (kind, layer, index) per receiver; write / read times for validity
        self.rinfo: list[tuple[str, int, int]] = []
        write, read = [0], []
        for layer in range(self.L):
            self.senders += [f"a{layer}.h{h}" for h in range(self.H)] + [f"m{layer}"]
            write += [2 * layer + 1] * self.H + [2 * layer + 2]
            for kind, n, prefix in (("q", self.H, "h"), ("k", self.K, kv), ("v", self.K, kv)):
                for i in range(n):
                    self.receivers.append(f"a{layer}.{prefix}{i}.{kind}")
                    self.rinfo.append((kind, layer, i))
                    read.append(2 * layer + 1)
            self.receivers.append(f"m{layer}")
            self.rinfo.append(("mlp", layer, 0))
            read.append(2 * layer + 2)
        self.receivers.append("logits")
        self.rinfo.append(("logits", self.L, 0))
        read.append(2 * self.L + 1)
        self.valid = torch.tensor(write)[:, None] < torch.tensor(read)[None]

    # ---------------------------------------------------------------- one hooked forward

    def run(
        self,
        tokens: torch.Tensor,
        perturb: dict[int, torch.Tensor] | None = None,
        input_shift: torch.Tensor | None = None,
        residual_shift: tuple[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and stacked sender outputs ``[n_senders, b, p, d]``.

        ``perturb[j]`` is added to receiver j's input; ``input_shift`` to the block-0 input
        (all paths); ``residual_shift=(l, e)`` to layer l's attention output (skip and MLP).
        """
        perturb = perturb or {}
        acts: dict[str, torch.Tensor] = {}
        handles = []
        pre_ln: dict[int, torch.Tensor] = {}

        def block0_pre(mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if input_shift is not None:
                hidden = hidden + input_shift
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": hidden}
            acts["input"] = hidden
            return args, kwargs

        handles.append(self.blocks[0].register_forward_pre_hook(block0_pre, with_kwargs=True))
        for layer, block in enumerate(self.blocks):
            ln1 = block.ln_1 if self.gpt2 else block.input_layernorm
            ln2 = block.ln_2 if self.gpt2 else block.post_attention_layernorm
            attn = block.attn if self.gpt2 else block.self_attn
            out_proj = attn.c_proj if self.gpt2 else attn.o_proj

            def save_pre_ln(mod, args, layer=layer):
                pre_ln[layer] = args[0]

            handles.append(ln1.register_forward_pre_hook(save_pre_ln))

            mine = {j: e for j, e in perturb.items() if self.rinfo[j][1] == layer}
            if self.gpt2:
                handles.append(
                    attn.c_attn.register_forward_hook(
                        self._gpt2_qkv(layer, ln1, attn, mine, pre_ln)
                    )
                )
            else:
                for kind, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
                    handles.append(
                        proj.register_forward_hook(
                            self._llama_proj(layer, kind, ln1, proj, mine, pre_ln)
                        )
                    )

            def heads(mod, args, layer=layer, out_proj=out_proj):
                z = args[0].unflatten(-1, (self.H, self.dh))
                w = out_proj.weight
                w = (
                    w.unflatten(0, (self.H, self.dh))
                    if self.gpt2
                    else w.T.unflatten(0, (self.H, self.dh))
                )
                result = torch.einsum("bphe,hed->hbpd", z, w)
                for h in range(self.H):
                    acts[f"a{layer}.h{h}"] = result[h]

            handles.append(out_proj.register_forward_pre_hook(heads))
            if residual_shift is not None and residual_shift[0] == layer:
                shift = residual_shift[1]
                handles.append(
                    attn.register_forward_hook(lambda mod, a, out, s=shift: (out[0] + s, *out[1:]))
                )
            mlp_j = [j for j in mine if self.rinfo[j][0] == "mlp"]
            if mlp_j:
                e = mine[mlp_j[0]]
                handles.append(
                    ln2.register_forward_pre_hook(lambda mod, args, e=e: (args[0] + e, *args[1:]))
                )

            def mlp_out(mod, args, out, layer=layer):
                acts[f"m{layer}"] = out

            handles.append(block.mlp.register_forward_hook(mlp_out))
        last = len(self.receivers) - 1
        if last in perturb:
            e = perturb[last]
            handles.append(
                self.final_norm.register_forward_pre_hook(
                    lambda mod, args: (args[0] + e, *args[1:])
                )
            )
        try:
            logits = self.m(tokens).logits
        finally:
            for h in handles:
                h.remove()
        return logits, torch.stack([acts[name] for name in self.senders])

    def _gpt2_qkv(self, layer, ln1, attn, mine, pre_ln):
        def hook(mod, args, out):
            out = out.clone()
            for j, e in mine.items():
                kind, _, i = self.rinfo[j]
                if kind == "mlp":
                    continue
                cols = slice(
                    "qkv".index(kind) * self.d + i * self.dh,
                    "qkv".index(kind) * self.d + (i + 1) * self.dh,
                )
                new = attn.c_attn.forward(ln1.forward(pre_ln[layer] + e))
                out[..., cols] = new[..., cols]
            return out

        return hook

    def _llama_proj(self, layer, kind, ln1, proj, mine, pre_ln):
        def hook(mod, args, out):
            out = out.clone()
            for j, e in mine.items():
                k, _, i = self.rinfo[j]
                if k != kind:
                    continue
                cols = slice(i * self.dh, (i + 1) * self.dh)
                out[..., cols] = proj.forward(ln1.forward(pre_ln[layer] + e))[..., cols]
            return out

        return hook

    # ---------------------------------------------------------------- derived quantities

    def receiver_grads(
        self, tokens: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor], input_shift=None
    ) -> torch.Tensor:
        """``dM/dx_r`` for every receiver, ``[n_receivers, b, p, d]``, via zero-valued leaves."""
        b, p = tokens.shape
        leaves = {
            j: torch.zeros(b, p, self.d, dtype=torch.float64, requires_grad=True)
            for j in range(len(self.receivers))
        }
        logits, _ = self.run(tokens, leaves, input_shift=input_shift)
        grads = torch.autograd.grad(metric(logits), list(leaves.values()))
        return torch.stack(grads)

    @torch.no_grad()
    def senders_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.run(tokens)[1]

    @torch.no_grad()
    def deltas(self, data: TaskData, ablation: str) -> torch.Tensor:
        """``a^ref - a^clean`` for every sender, ``[n_senders, b, p, d]``."""
        clean = self.senders_of(data.clean)
        if ablation == "corrupt":
            ref = self.senders_of(data.corrupt)
        elif ablation == "mean":
            mask = data.attention_mask.double()[None, :, :, None]
            ref = ((clean * mask).sum(1) / mask.sum(1))[:, None].expand_as(clean)
        else:
            ref = torch.zeros_like(clean)
        return ref - clean

    def eap(self, data: TaskData, ablation: str, steps: int = 1) -> torch.Tensor:
        delta = self.deltas(data, ablation)
        metric = make_metric(data)
        grads = 0
        for k in range(steps, 0, -1):  # alpha = k / steps
            shift = (1 - k / steps) * delta[0]
            grads = grads + self.receiver_grads(data.clean, metric, input_shift=shift) / steps
        return torch.einsum("sbpd,rbpd->sr", delta, grads) * self.valid

    @torch.no_grad()
    def exact(self, data: TaskData, ablation: str, edges: list[tuple[int, int]]) -> list[float]:
        delta = self.deltas(data, ablation)
        metric = make_metric(data)
        base = float(metric(self.run(data.clean)[0]))
        return [float(metric(self.run(data.clean, {r: delta[s]})[0])) - base for s, r in edges]


def make_metric(data: TaskData) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mean over examples of the logit difference at each example's metric position."""
    rows = torch.arange(len(data))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = logits[rows, data.positions]
        return (at[rows, data.correct] - at[rows, data.wrong]).sum() / len(data)

    return metric


def build(family: str, dtype=torch.float64, seed: int = 0, **kw):
    """``(bridge, HFReference)`` over two identical copies of one random module."""
    module = (tiny_gpt2_module if family == "gpt2" else tiny_llama_module)(
        seed=seed, dtype=dtype, **kw
    )
    return ctlens.load_model(copy.deepcopy(module)), HFReference(module)


def assert_scores_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    expected = expected.to(got.dtype)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(params=["gpt2", "llama"])
def pair(request):
    return build(request.param)


@pytest.fixture(autouse=True)
def exact_float64_rmsnorm(monkeypatch):
    """HF's LlamaRMSNorm computes in float32 even for float64 inputs; finite differences
    need the float64 function, so float64 inputs get an exact RMSNorm here."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm.forward

    def forward(self, x):
        if x.dtype != torch.float64:
            return original(self, x)
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


# ------------------------------------------------------------------------------ the oracle itself


def test_reference_names_match_graph(pair):
    model, ref = pair
    graph = Graph.from_model(model)
    assert ref.senders == graph.senders and ref.receivers == graph.receivers
    assert torch.equal(ref.valid, graph.valid)


def test_reference_senders_sum_to_receiver_inputs(pair):
    """Sanity of the oracle: logits' input = sum of all senders + constant biases (GPT-2)."""
    model, ref = pair
    tokens = random_task().clean
    logits, acts = ref.run(tokens)
    torch.testing.assert_close(logits, ref.m(tokens).logits)
    with torch.no_grad():
        bridge_logits = model(tokens)
    torch.testing.assert_close(bridge_logits, logits)
    captured = {}
    model.run_with_hooks(
        tokens, fwd_hooks=[("ln_final.hook_in", lambda x, hook: captured.setdefault("x", x))]
    )
    bias = captured["x"] - acts.sum(0)  # sum of b_O over layers (GPT-2) or 0 (Llama)
    assert (bias - bias[:1, :1]).abs().max() < 1e-8  # Llama's rotary tables are fp32


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize(
    "receiver", ["a1.h2.q", "a1.X1.k", "a0.X0.v", "a1.X0.v", "m0", "m1", "logits"]
)
def test_receiver_gradient_matches_finite_difference(pair, receiver):
    """ctlens's receiver input gradient (via `receiver_hooks`) against a central difference."""
    model, ref = pair
    receiver = receiver.replace("X", "g" if ref.K != ref.H else "h")
    data = random_task()
    metric = make_metric(data)
    graph = Graph.from_model(model)
    j = graph.receiver_index[receiver]

    inputs: dict[int, torch.Tensor] = {}

    def keep(columns: slice, n_up: int, x: torch.Tensor) -> torch.Tensor:
        inputs[columns.start] = x
        return x

    with frozen_parameters(model), torch.enable_grad():
        embed = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))]
        logits = model.run_with_hooks(
            data.clean, fwd_hooks=embed + receiver_hooks(model, graph, keep)
        )
        start = max(c for c in inputs if c <= j)
        (grad,) = torch.autograd.grad(metric(logits), inputs[start])
    grad = grad[:, :, j - start] if grad.ndim == 4 else grad

    u = torch.randn(
        *data.clean.shape, ref.d, dtype=torch.float64, generator=torch.Generator().manual_seed(j)
    )
    eps = 1e-6
    with torch.no_grad():
        plus = float(metric(ref.run(data.clean, {j: eps * u})[0]))
        minus = float(metric(ref.run(data.clean, {j: -eps * u})[0]))
    fd = (plus - minus) / (2 * eps)
    analytic = float((grad * u).sum())
    assert abs(fd) > 1e-6
    assert math.isclose(analytic, fd, rel_tol=1e-6), (receiver, analytic, fd)

    if receiver.startswith("m"):
        # the MLP receiver's gradient excludes the skip path: perturbing the residual stream
        # itself (skip + MLP) gives a clearly different derivative
        layer = int(receiver[1:])
        with torch.no_grad():
            plus = float(metric(ref.run(data.clean, residual_shift=(layer, eps * u))[0]))
            minus = float(metric(ref.run(data.clean, residual_shift=(layer, -eps * u))[0]))
        total = (plus - minus) / (2 * eps)
        assert abs(total - analytic) > 0.05 * abs(total)


# ------------------------------------------------------------------------------ EAP oracles


@pytest.mark.parametrize("ablation", ["corrupt", "mean", "zero"])
def test_eap_equals_independent_reference(pair, ablation):
    """Padded examples, several batches (batch_size 4 < 6 examples), float64 model."""
    model, ref = pair
    data = random_task(n=6, seq=7)
    assert not data.attention_mask.all()
    scores = ctlens.attribute(model, data, ablation=ablation, batch_size=4, progress=False)
    assert scores.scores.dtype == torch.float32
    assert (scores.scores[~scores.graph.valid] == 0).all()
    assert_scores_close(scores.scores, ref.eap(data, ablation))
    assert scores.metadata["method"] == "eap" and scores.metadata["ablation"] == ablation
    assert scores.metadata["n_examples"] == 6


def test_eap_ig_equals_independent_reference(pair):
    model, ref = pair
    data = random_task(n=5, seq=6, seed=3)
    scores = ctlens.attribute(model, data, method="eap-ig", steps=3, batch_size=3, progress=False)
    assert_scores_close(scores.scores, ref.eap(data, "corrupt", steps=3))
    assert scores.metadata["steps"] == 3
    assert not torch.allclose(scores.scores, ref.eap(data, "corrupt").float(), rtol=1e-3)
    one = ctlens.attribute(model, data, method="eap-ig", steps=1, progress=False)
    assert_scores_close(one.scores, ref.eap(data, "corrupt"))  # one step at alpha=1 is EAP


def test_mean_reference_options_agree():
    model, ref = build("gpt2")
    data = random_task(n=6, seq=7)
    default = ctlens.attribute(model, data, ablation="mean", batch_size=4, progress=False)
    means = mean_activations(model, data, batch_size=5)
    assert means.shape == (11, 7, 32)
    pre = ctlens.attribute(model, data, ablation="mean", reference=means, progress=False)
    torch.testing.assert_close(pre.scores, default.scores)
    # token ids as the reference set: every token counts, so the means differ from the default
    other = random_task(n=4, seq=9, seed=7).clean.clamp(min=1)
    tok = ctlens.attribute(model, data, ablation="mean", reference=other, progress=False)
    acts = ref.senders_of(other)
    delta = acts.mean(1)[:, None, :7] - ref.senders_of(data.clean)
    grads = ref.receiver_grads(data.clean, make_metric(data))
    assert_scores_close(tok.scores, torch.einsum("sbpd,rbpd->sr", delta, grads) * ref.valid)


def test_corrupt_reference_argument_overrides_data():
    model, ref = build("llama")
    data = random_task()
    swapped = TaskData(
        clean=data.clean,
        corrupt=data.corrupt.flip(0) * data.attention_mask,
        correct=data.correct,
        wrong=data.wrong,
        attention_mask=data.attention_mask,
    )
    a = ctlens.attribute(model, data, reference=swapped.corrupt, progress=False)
    b = ctlens.attribute(model, swapped, progress=False)
    torch.testing.assert_close(a.scores, b.scores)


# ---------------------------------------------------------------------- TransformerLens oracle


def tl_node_name(node) -> str:
    """TransformerLens 4.3 attribution-patching node -> ctlens node name."""
    kind, layer, head = node.kind, node.layer, node.head
    return {
        "embed": lambda: "input",
        "attn_head_out": lambda: f"a{layer}.h{head}",
        "mlp_out": lambda: f"m{layer}",
        "q_input": lambda: f"a{layer}.h{head}.q",
        "k_input": lambda: f"a{layer}.h{head}.k",
        "v_input": lambda: f"a{layer}.h{head}.v",
        "mlp_in": lambda: f"m{layer}",
        "logits": lambda: "logits",
    }[kind]()


@pytest.mark.parametrize("family", ["gpt2", "llama-mha", "neox-parallel"])
def test_eap_equals_transformer_lens_attribution_patch(family):
    """TL's denoising form with clean/corrupt swapped equals ctlens EAP (DESIGN.md)."""
    from transformer_lens.tools.analysis.attribution_patching import (
        EdgeAttributionConfig,
        attribution_patch,
    )

    if family == "gpt2":
        module = tiny_gpt2_module(dtype=torch.float64)
    elif family == "neox-parallel":  # parallel attention + MLP: TL drops same-layer head -> MLP
        module = tiny_neox_module(dtype=torch.float64)
    else:  # TL refuses grouped-query attention; a Llama with as many KV heads as heads
        module = tiny_llama_module(dtype=torch.float64, n_kv_heads=4)
    model = ctlens.load_model(module)
    data = random_task(n=3, seq=6, seed=5)
    ours = ctlens.attribute(model, data, batch_size=2, progress=False)
    graph = ours.graph

    total = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    for i in range(len(data)):
        pos, good, bad = int(data.positions[i]), int(data.correct[i]), int(data.wrong[i])
        result = attribution_patch(
            model,
            data.corrupt[i : i + 1],
            data.clean[i : i + 1],
            lambda logits, pos=pos, good=good, bad=bad: logits[0, pos, good] - logits[0, pos, bad],
            EdgeAttributionConfig(granularity="edge"),
        )
        for (writer, reader), value in result.edge_scores.items():
            s, r = graph.edge_index(tl_node_name(writer), tl_node_name(reader))
            total[s, r] += value
    assert_scores_close(ours.scores, total / len(data))
    assert graph.spec.parallel_attn_mlp == (family == "neox-parallel")


# ------------------------------------------------------------------------------ exact


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exact_equals_hand_patched_edges(family):
    model, ref = build(family)
    data = random_task(n=5, seq=6, seed=2)
    ablation = "corrupt" if family == "gpt2" else "mean"
    scores = ctlens.attribute(
        model, data, method="exact", ablation=ablation, batch_size=3, progress=False
    )
    graph = scores.graph
    names = [
        ("input", "a0.h1.q"),
        ("a0.h0", "a1.X1.k"),
        ("m0", "a1.X0.v"),
        ("a0.h3", "m0"),
        ("input", "m1"),
        ("a1.h2", "logits"),
        ("m1", "logits"),
        ("input", "logits"),
    ]
    kv = "g" if family == "llama" else "h"
    edges = [graph.edge_index(s, r.replace("X", kv)) for s, r in names]
    expected = ref.exact(data, ablation, edges)
    got = [float(scores.scores[s, r]) for s, r in edges]
    for (s, r), g, e in zip(edges, got, expected, strict=True):
        assert math.isclose(g, e, rel_tol=1e-5, abs_tol=1e-6), (
            graph.senders[s],
            graph.receivers[r],
            g,
            e,
        )
    assert max(abs(e) for e in expected) > 1e-3


def test_eap_and_eap_ig_track_exact():
    """On a tiny model the first-order scores correlate strongly with the true effects."""
    model, _ = build("gpt2")
    data = random_task(n=8, seq=7, seed=4)
    exact = ctlens.attribute(model, data, method="exact", progress=False).scores
    valid = Graph.from_model(model).valid
    for method in ("eap", "eap-ig"):
        est = ctlens.attribute(model, data, method=method, progress=False).scores
        corr = torch.corrcoef(torch.stack([est[valid], exact[valid]]))[0, 1]
        assert corr > 0.9, (method, float(corr))


# ------------------------------------------------------------------------------ EdgeScores


def test_edge_scores_views():
    model, _ = build("llama")
    scores = ctlens.attribute(model, random_task(), progress=False)
    graph = scores.graph
    top = scores.top(5)
    magnitudes = [abs(v) for _, _, v in top]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert magnitudes[0] == float(scores.scores.abs().max())
    s, r, v = top[0]
    assert scores.scores[graph.sender_index[s], graph.receiver_index[r]] == v
    assert len(scores.top(graph.n_edges)) == graph.n_edges
    with pytest.raises(
        ValueError,
        match=rf"k={graph.n_edges + 1} is larger than the number of valid edges "
        rf"\({graph.n_edges}\)",
    ):
        scores.top(graph.n_edges + 1)
    with pytest.raises(ValueError, match="positive integer"):
        scores.top(0)
    nodes = scores.node_scores()
    assert nodes["a0.h1"] == pytest.approx(float(scores.scores[graph.sender_index["a0.h1"]].sum()))
    back = EdgeScores.from_networkx(scores.to_networkx())
    assert torch.equal(back.scores, scores.scores) and back.graph == graph
    assert back.metadata == scores.metadata
    assert "eap" in repr(scores)
    with pytest.raises(ValueError, match="expected \\(11, 27\\)"):
        EdgeScores(torch.zeros(3, 3), Graph.from_model(build("gpt2")[0]))


def test_node_score_is_node_ablation_to_first_order():
    """Sum of a sender's edge scores = (a_ref - a_clean) . dM/d(a_s) (its direct node effect)."""
    model, ref = build("gpt2")
    data = random_task()
    scores = ctlens.attribute(model, data, progress=False)
    delta = ref.deltas(data, "corrupt")
    metric = make_metric(data)
    # gradient with respect to each sender's output: add a zero leaf to the block-0 input
    # (input) and compare the total over its edges
    leaf = torch.zeros_like(delta[0], requires_grad=True)
    logits, _ = ref.run(data.clean, input_shift=leaf)
    (grad,) = torch.autograd.grad(metric(logits), leaf)
    assert scores.node_scores()["input"] == pytest.approx(float((delta[0] * grad).sum()), rel=1e-5)


# ---------------------------------------------------------------------- bad inputs and state


def test_attribute_errors():
    model, _ = build("gpt2", dtype=torch.float32)
    data = random_task()
    with pytest.raises(ValueError, match="unknown method 'ig'"):
        ctlens.attribute(model, data, method="ig")
    with pytest.raises(ValueError, match="unknown ablation 'random'"):
        ctlens.attribute(model, data, ablation="random")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        ctlens.attribute(model, data, method="eap-ig", steps=0)
    with pytest.raises(TypeError, match="must be a ctlens.TaskData"):
        ctlens.attribute(model, data.clean)
    with pytest.raises(ValueError, match="zero ablation takes no reference"):
        ctlens.attribute(model, data, ablation="zero", reference=data.clean)
    no_corrupt = TaskData(
        clean=data.clean, correct=data.correct, wrong=data.wrong, attention_mask=data.attention_mask
    )
    with pytest.raises(
        ValueError, match="corrupt ablation needs corrupted prompts.*ablation='mean'"
    ):
        ctlens.attribute(model, no_corrupt)
    with pytest.raises(ValueError, match=r"corrupt reference must be token ids of shape \(6, 7\)"):
        ctlens.attribute(model, data, reference=data.clean[:, :3])
    big = TaskData(clean=data.clean + VOCAB, correct=data.correct, wrong=data.wrong)
    with pytest.raises(ValueError, match=f"outside the model's vocabulary of {VOCAB}"):
        ctlens.attribute(model, big)
    with pytest.raises(
        ValueError, match="the mean reference covers 3 positions but the data has 7"
    ):
        ctlens.attribute(model, data, ablation="mean", reference=data.clean[:, :3])
    with pytest.raises(ValueError, match="precomputed means must be"):
        ctlens.attribute(model, data, ablation="mean", reference=torch.zeros(2, 7, 32))


@pytest.mark.parametrize("bad", ["vector", "nan"])
def test_bad_metric_is_refused_and_model_state_restored(bad):
    model, _ = build("llama", dtype=torch.float32)
    model.train()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    data = random_task()
    metric = (
        (lambda lg, b: lg[:, -1]) if bad == "vector" else (lambda lg, b: lg[:, -1, 0] * math.nan)
    )
    data = TaskData(
        clean=data.clean, corrupt=data.corrupt, attention_mask=data.attention_mask, metric=metric
    )
    match = "returned shape" if bad == "vector" else "returned NaN"
    with pytest.raises(ValueError, match=match):
        ctlens.attribute(model, data, progress=False)
    assert model.training
    assert all(m.training for m in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_attribute_leaves_model_untouched():
    model, _ = build("gpt2", dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    n_hooks = sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values())
    model.train()
    ctlens.attribute(model, random_task(), method="eap-ig", progress=False)
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()) == n_hooks


def test_sender_hooks_report_every_sender_once():
    model, ref = build("llama")
    graph = Graph.from_model(model)
    tokens = random_task().clean
    seen = torch.zeros(graph.n_senders, *tokens.shape, ref.d, dtype=torch.float64)

    def record(rows: slice, act: torch.Tensor) -> None:
        seen[rows] += (act[:, :, None] if act.ndim == 3 else act).permute(2, 0, 1, 3)

    model.run_with_hooks(tokens, fwd_hooks=sender_hooks(model, graph, record))
    torch.testing.assert_close(seen, ref.senders_of(tokens))


def test_truncated_forward_matches_full_logits(pair):
    """`run_to_final_residual` + `final_logits` at chosen positions = the full forward's."""
    from ctlens.bridge.hooks import final_logits, run_to_final_residual

    model, _ = pair
    data = random_task()
    with torch.no_grad():
        full = model(data.clean)
        residual = run_to_final_residual(model, data.clean, [])
        rows = torch.arange(len(data))[:, None]
        at = final_logits(model, residual[rows, data.positions_2d])
        torch.testing.assert_close(at, full[rows, data.positions_2d])
        torch.testing.assert_close(model(data.clean), full)  # the stopped forward left no state
    assert not any(h.fwd_hooks for h in model.hook_dict.values())
    custom = TaskData(
        clean=data.clean,
        corrupt=data.corrupt,
        attention_mask=data.attention_mask,
        metric=lambda logits, batch: make_metric(batch)(logits),  # the batch mean
        correct=data.correct,
        wrong=data.wrong,
    )
    # a custom metric sees full logits (no truncation) and gives the same scores
    a = ctlens.attribute(model, custom, progress=False)
    b = ctlens.attribute(model, data, progress=False)
    assert_scores_close(a.scores, b.scores)


# ---------------------------------------------------------------------- silent wrong results


def _with_metric(data: TaskData, metric: Callable[..., torch.Tensor]) -> TaskData:
    return TaskData(
        clean=data.clean, corrupt=data.corrupt, attention_mask=data.attention_mask, metric=metric
    )


@pytest.mark.parametrize("kind", ["inf", "logprob-minus-inf"])
def test_non_finite_metric_names_the_example(kind):
    """A metric that is inf (or a log-prob that is -inf) on one example is refused by name,
    with the row counted across batches (example 4 sits in the second batch of 3)."""
    model, _ = build("gpt2", dtype=torch.float32)
    data = random_task()

    def metric(logits: torch.Tensor, batch: TaskData) -> torch.Tensor:
        last = logits[torch.arange(len(batch)), batch.positions]
        probs = last.softmax(-1)[:, 1]
        is_bad = (batch.clean == data.clean[4, : batch.clean.shape[1]]).all(1)
        if kind == "inf":
            return torch.where(is_bad, math.inf, probs)
        return torch.log(torch.where(is_bad, 0.0, probs))

    expected = "inf" if kind == "inf" else "-inf"
    with pytest.raises(ValueError, match=rf"example 4: the metric returned {expected} \(not fin"):
        ctlens.attribute(model, _with_metric(data, metric), batch_size=3, progress=False)


@pytest.mark.parametrize("kind", ["detached", "integer"])
def test_non_differentiable_metric_says_so(kind):
    model, _ = build("gpt2", dtype=torch.float32)
    data = random_task()

    def metric(logits: torch.Tensor, batch: TaskData) -> torch.Tensor:
        last = logits[torch.arange(len(batch)), batch.positions]
        if kind == "detached":
            return last.detach()[:, 1] - last.detach()[:, 2]
        return (last.argmax(-1) == 1).long()

    task = _with_metric(data, metric)
    for method in ("eap", "eap-ig"):
        with pytest.raises(ValueError, match="must be differentiable in the logits"):
            ctlens.attribute(model, task, method=method, progress=False)
    # exact patching never differentiates, so the same metric works there
    exact = ctlens.attribute(model, task, method="exact", progress=False)
    assert torch.isfinite(exact.scores).all()


def test_float16_overflow_says_float16():
    """Gradients beyond float16's range (65,504) overflow to inf: the error names float16
    and suggests bfloat16 / float32, where the same run is finite."""
    data = random_task()

    def huge(logits: torch.Tensor, batch: TaskData) -> torch.Tensor:
        last = logits[torch.arange(len(batch)), batch.positions].float()
        return (last[:, 1] - last[:, 2]) * 1e6

    task = _with_metric(data, huge)
    half = ctlens.load_model(tiny_gpt2_module(dtype=torch.float16))
    with pytest.raises(ValueError, match="float16 overflowed.*bfloat16.*float32"):
        ctlens.attribute(half, task, progress=False)
    full = ctlens.load_model(tiny_gpt2_module(dtype=torch.float32))
    assert torch.isfinite(ctlens.attribute(full, task, progress=False).scores).all()


def test_sequence_longer_than_context_is_refused():
    """tiny GPT-2 has 16 positions; 20 tokens used to end in an IndexError in the embedding."""
    model, _ = build("gpt2", dtype=torch.float32)
    data = random_task(seq=20)
    with pytest.raises(ValueError, match="example 0 has 20 tokens but the model's context is 16"):
        ctlens.attribute(model, data, progress=False)


def test_faithfulness_refuses_sequences_longer_than_context():
    model, _ = build("gpt2", dtype=torch.float32)
    data = random_task(seq=20)
    circuit = ctlens.Circuit.full(Graph.from_model(model))
    with pytest.raises(ValueError, match="example 0 has 20 tokens but the model's context is 16"):
        ctlens.faithfulness(model, data, circuit)
