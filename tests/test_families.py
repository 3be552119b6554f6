"""End-to-end checks of every supported model family on tiny random models built offline.

For each family (GPT-2, Llama with grouped-query attention, Mistral, Qwen2 with q/k/v biases,
Qwen3 with per-head q/k norms, GPT-NeoX/Pythia with parallel blocks and partial rotary, Phi-3
with fused qkv and fused gate/up, OLMo) a small random HF model is built from its config and
loaded with `ctlens.load_model`. The oracle is the *plain HF module* (a separate copy; the
bridge rewires the module it wraps), read and perturbed with PyTorch hooks that know each
family's module names (`Family`):

- a q/k/v receiver's input is perturbed by recomputing only that head's (KV head's) columns
  of the (possibly fused) projection from ``norm(x + e)``; an MLP receiver's by adding ``e``
  to the pre-MLP norm's input only (not the skip path); ``logits`` by adding ``e`` to the
  final norm's input;
- senders are read as the block-0 input, per-head ``z_h @ W_O[h]`` at the output
  projection's input, and the MLP's output.

Checked: (a) logits, (b) each receiver kind's gradient against a central difference,
(c) ``exact`` against hand patching on the HF module and ``eap`` against ``exact`` on a
small-weight model, (d) which HF parameter entries a restricted optimizer step moves (fused
parameters sliced, never whole), (e) `export_hf` round trip through ``transformers``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from conftest import VOCAB, random_task, tiny_gpt2_module, tiny_llama_module
from torch import nn

import ctlens
from ctlens.bridge.hooks import frozen_parameters, receiver_hooks, sender_hooks
from ctlens.graph import Graph, GraphSpec
from ctlens.model import UnsupportedModelError
from ctlens.tuning.weights import export_hf, hf_state_dict

SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def _hf(arch: str, config_cls: str, **extra: object) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(**{**SMALL, **extra})
        return getattr(transformers, arch)(config)

    return build


@dataclass(frozen=True)
class Family:
    """How to build one family and where its components live in the plain HF module."""

    name: str
    build: Callable[[int], nn.Module]
    layers: str  # attribute path of the block list
    final_norm: str
    ln1: str | None  # the norm q/k/v read through (None: they read the residual itself)
    ln2: str | None  # the norm the MLP reads through
    attn: str
    fused_qkv: str | None  # a fused projection's name, or None for q_proj/k_proj/v_proj
    out_proj: str
    mlp_in: tuple[str, ...]  # under the block's mlp
    mlp_out: str
    layout: str = "blocks"  # fused column layout: "blocks" [q|k|v] or "heads" [h, 3, d]
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]

    def module(self, seed: int = 0) -> nn.Module:
        return self.build(seed).to(torch.float64).eval()


def _gpt2(seed: int) -> nn.Module:
    return tiny_gpt2_module(seed=seed)


def _llama(seed: int) -> nn.Module:
    return tiny_llama_module(seed=seed, n_kv_heads=2)


LLAMA_LIKE = dict(
    layers="model.layers",
    final_norm="model.norm",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="self_attn",
    fused_qkv=None,
    out_proj="o_proj",
    mlp_in=("gate_proj", "up_proj"),
    mlp_out="down_proj",
)

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "gpt2",
            _gpt2,
            layers="transformer.h",
            final_norm="transformer.ln_f",
            ln1="ln_1",
            ln2="ln_2",
            attn="attn",
            fused_qkv="c_attn",
            out_proj="c_proj",
            mlp_in=("c_fc",),
            mlp_out="c_proj",
            conv1d=True,
        ),
        Family("llama", _llama, **LLAMA_LIKE),
        Family(
            "mistral",
            _hf("MistralForCausalLM", "MistralConfig", num_key_value_heads=2),
            **LLAMA_LIKE,
        ),
        Family(
            "qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2), **LLAMA_LIKE
        ),
        Family(
            "qwen3",
            _hf("Qwen3ForCausalLM", "Qwen3Config", num_key_value_heads=2, head_dim=8),
            **LLAMA_LIKE,
        ),
        Family(
            "neox",
            _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", rotary_pct=0.25),
            layers="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            ln1="input_layernorm",
            ln2="post_attention_layernorm",
            attn="attention",
            fused_qkv="query_key_value",
            out_proj="dense",
            mlp_in=("dense_h_to_4h",),
            mlp_out="dense_4h_to_h",
            layout="heads",
        ),
        Family(
            "phi3",
            _hf("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2),
            **{**LLAMA_LIKE, "fused_qkv": "qkv_proj", "mlp_in": ("gate_up_proj",)},
        ),
        Family("olmo", _hf("OlmoForCausalLM", "OlmoConfig", num_key_value_heads=2), **LLAMA_LIKE),
    )
}
GEMMA_LIKE = {**LLAMA_LIKE, "ln2": "pre_feedforward_layernorm"}
# Sublayer outputs normalised before the residual sum: only under approximate="frozen-norm".
FROZEN = {
    f.name: f
    for f in (
        Family(
            "gemma2",
            _hf("Gemma2ForCausalLM", "Gemma2Config", num_key_value_heads=2, head_dim=8),
            **GEMMA_LIKE,
        ),
        Family(
            "gemma3",
            _hf("Gemma3ForCausalLM", "Gemma3TextConfig", num_key_value_heads=2, head_dim=8),
            **GEMMA_LIKE,
        ),
        Family(
            "olmo2",
            _hf("Olmo2ForCausalLM", "Olmo2Config", num_key_value_heads=2),
            **{**LLAMA_LIKE, "ln1": None, "ln2": None},
        ),
    )
}


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF's RMSNorms, OLMo's LayerNorm and the eager attention softmax (which Gemma 2 uses for
    its logit soft-capping) compute in float32 even for float64 inputs; finite differences
    and exact patching need float64 functions, so float64 inputs get them."""
    softmax = torch.nn.functional.softmax

    def softmax64(x: torch.Tensor, dim: int | None = None, *args: object, **kw: object):
        if x.dtype == torch.float64:
            kw.pop("dtype", None)
        return softmax(x, dim, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)

    def rms(self: nn.Module, x: torch.Tensor, original: Callable) -> torch.Tensor:
        if x.dtype != torch.float64:
            return original(self, x)
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    for module_name, cls in (
        ("llama", "LlamaRMSNorm"),
        ("mistral", "MistralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"),
        ("qwen3", "Qwen3RMSNorm"),
        ("phi3", "Phi3RMSNorm"),
    ):
        target = getattr(
            __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[cls]),
            cls,
        )
        original = target.forward
        monkeypatch.setattr(target, "forward", lambda self, x, o=original: rms(self, x, o))
    from transformers.models.olmo import modeling_olmo

    olmo_original = modeling_olmo.OlmoLayerNorm.forward

    def olmo_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float64:
            return olmo_original(self, x)
        return nn.functional.layer_norm(x, self.normalized_shape, None, None, eps=1e-5)

    monkeypatch.setattr(modeling_olmo.OlmoLayerNorm, "forward", olmo_norm)
    from transformers.models.olmo2 import modeling_olmo2

    olmo2_original = modeling_olmo2.Olmo2RMSNorm.forward
    monkeypatch.setattr(
        modeling_olmo2.Olmo2RMSNorm, "forward", lambda self, x: rms(self, x, olmo2_original)
    )
    for module_name, cls in (("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm")):
        target = getattr(
            __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[cls]),
            cls,
        )
        monkeypatch.setattr(
            target, "forward", lambda self, x, o=target.forward: gemma_rms(self, x, o)
        )


def gemma_rms(self: nn.Module, x: torch.Tensor, original: Callable) -> torch.Tensor:
    """Gemma's RMSNorm, ``(1 + w) * x / rms(x)``, in float64 for float64 inputs."""
    if x.dtype != torch.float64:
        return original(self, x)
    return (1.0 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ------------------------------------------------------------------------------ the oracle


class HFOracle:
    """Sender reads and receiver perturbations on a plain HF module of one family."""

    def __init__(self, family: Family, module: nn.Module) -> None:
        self.f, self.m = family, module.eval()
        cfg = module.config
        self.H = cfg.num_attention_heads
        self.K = getattr(cfg, "num_key_value_heads", None) or self.H
        self.d = cfg.hidden_size
        self.dh = getattr(cfg, "head_dim", None) or self.d // self.H
        self.blocks = list(_get(module, family.layers))
        parallel = bool(getattr(cfg, "use_parallel_residual", False))
        self.graph = Graph(GraphSpec(len(self.blocks), self.H, self.K, parallel))

    def qkv_columns(self, kind: str, index: int) -> tuple[str, slice]:
        """The projection (attribute of the attention module) and output columns of one
        q/k/v receiver."""
        dh, H, K = self.dh, self.H, self.K
        if self.f.fused_qkv is None:
            return f"{kind}_proj", slice(index * dh, (index + 1) * dh)
        k = "qkv".index(kind)
        if self.f.layout == "heads":
            start = index * 3 * dh + k * dh
        else:
            start = (0, H * dh, H * dh + K * dh)[k] + index * dh
        return self.f.fused_qkv, slice(start, start + dh)

    def run(
        self, tokens: torch.Tensor, perturb: dict[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and stacked sender outputs ``[n_senders, b, p, d]``; ``perturb[j]`` is
        added to receiver j's input."""
        perturb = perturb or {}
        nodes = self.graph.receiver_nodes
        acts: dict[str, torch.Tensor] = {}
        pre: dict[int, torch.Tensor] = {}
        handles = []

        def block0(mod, args, kwargs):
            acts["input"] = args[0] if args else kwargs["hidden_states"]

        handles.append(self.blocks[0].register_forward_pre_hook(block0, with_kwargs=True))
        for layer, block in enumerate(self.blocks):
            attn = _get(block, self.f.attn)
            if self.f.ln1 is None:  # OLMo-2: q/k/v read the residual stream directly
                ln1: nn.Module = nn.Identity()
                handles.append(
                    attn.register_forward_pre_hook(
                        lambda mod, args, kwargs, lay=layer: pre.update(
                            {lay: args[0] if args else kwargs["hidden_states"]}
                        ),
                        with_kwargs=True,
                    )
                )
            else:
                ln1 = _get(block, self.f.ln1)
                handles.append(
                    ln1.register_forward_pre_hook(
                        lambda mod, args, lay=layer: pre.update({lay: args[0]})
                    )
                )
            mine = {
                j: e
                for j, e in perturb.items()
                if nodes[j].layer == layer and nodes[j].kind.value in "qkv"
            }
            for j, e in mine.items():
                proj_name, cols = self.qkv_columns(nodes[j].kind.value, nodes[j].head)
                proj = getattr(attn, proj_name)
                handles.append(
                    proj.register_forward_hook(self._patch(proj, ln1, pre, layer, e, cols))
                )
            handles.append(
                getattr(attn, self.f.out_proj).register_forward_pre_hook(self._heads(layer, acts))
            )
            mlp_j = self.graph.receiver_index[f"m{layer}"]
            if mlp_j in perturb:
                e = perturb[mlp_j]
                mlp_reads = block.mlp if self.f.ln2 is None else _get(block, self.f.ln2)
                handles.append(
                    mlp_reads.register_forward_pre_hook(
                        lambda mod, args, e=e: (args[0] + e, *args[1:])
                    )
                )
            handles.append(
                block.mlp.register_forward_hook(
                    lambda mod, args, out, lay=layer: acts.update({f"m{lay}": out})
                )
            )
        last = self.graph.n_receivers - 1
        if last in perturb:
            e = perturb[last]
            handles.append(
                _get(self.m, self.f.final_norm).register_forward_pre_hook(
                    lambda mod, args: (args[0] + e, *args[1:])
                )
            )
        try:
            logits = self.m(tokens).logits
        finally:
            for h in handles:
                h.remove()
        return logits, torch.stack([acts[name] for name in self.graph.senders])

    def _patch(self, proj, ln1, pre, layer, e, cols):
        def hook(mod, args, out):
            out = out.clone()
            out[..., cols] = proj.forward(ln1.forward(pre[layer] + e))[..., cols]
            return out

        return hook

    def _heads(self, layer, acts):
        def hook(mod, args):
            z = args[0].unflatten(-1, (self.H, self.dh))
            w = mod.weight if self.f.conv1d else mod.weight.T
            result = torch.einsum("bphe,hed->hbpd", z, w.unflatten(0, (self.H, self.dh)))
            for h in range(self.H):
                acts[f"a{layer}.h{h}"] = result[h]

        return hook


def make_metric(data: ctlens.TaskData) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mean logit difference at each example's metric position (ctlens's logit_diff)."""
    rows = torch.arange(len(data))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = logits[rows, data.positions]
        return (at[rows, data.correct] - at[rows, data.wrong]).sum() / len(data)

    return metric


def load(family: Family, seed: int = 0, scale: float | None = None):
    """``(bridge, oracle)`` over two identical copies of one random float64 module.

    With ``scale``, every matrix but the embedding is multiplied by it, the token embeddings
    are pulled towards their mean by the same factor and (frozen-norm families) the
    post-sublayer norms' gains shrink by it: a model in which patching any edge is a small
    change of its receiver's input, so first-order scores are close to exact ones.
    """
    module = family.module(seed)
    if scale is not None:
        embed = module.get_input_embeddings().weight
        with torch.no_grad():
            for p in module.parameters():
                if p.ndim == 2 and p is not embed:
                    p.mul_(scale)
            embed.copy_(embed.mean(0) + scale * (embed - embed.mean(0)))
            if family.name in FROZEN:  # normalised sublayer outputs: shrink the post-norm gain
                offset = 1.0 if family.name.startswith("gemma") else 0.0
                for name, p in module.named_parameters():
                    if "post_attention_layernorm" in name or "post_feedforward" in name:
                        p.copy_((p + offset) * scale - offset)
    approximate = "frozen-norm" if family.name in FROZEN else None
    model = ctlens.load_model(copy.deepcopy(module), approximate=approximate)
    return model, HFOracle(family, module)


NAMES = list(FAMILIES)
ALL = {**FAMILIES, **FROZEN}
ALL_NAMES = list(ALL)
TOKENS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 40, 49, 1]])


# ------------------------------------------------------------------------------ (a) logits


@pytest.mark.parametrize("name", ALL_NAMES)
def test_logits_and_graph_match_hf(name):
    model, oracle = load(ALL[name])
    with torch.no_grad():
        expected, senders = oracle.run(TOKENS)
        got = model(TOKENS)
    # HF computes rotary tables in float32 for every dtype; the bridge's differ at that scale
    tol = 1e-10 if name == "gpt2" else 1e-6
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert Graph.from_model(model).spec.n_kv_heads == oracle.graph.spec.n_kv_heads
    if name in FROZEN:
        return  # senders are normalised shares there: test_frozen_norm_decomposition_is_exact
    assert Graph.from_model(model) == oracle.graph
    # the logits receiver's input is the sum of every sender plus constant biases
    captured = {}
    with torch.no_grad():
        model.run_with_hooks(
            TOKENS, fwd_hooks=[("ln_final.hook_in", lambda x, hook: captured.update(x=x))]
        )
    bias = captured["x"] - senders.sum(0)
    assert float((bias - bias[:1, :1]).abs().max()) < tol


# ------------------------------------------------------------------------------ (b) gradients

RECEIVERS = ["a1.h2.q", "a1.X1.k", "a0.X0.v", "m0", "m1", "logits"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_receiver_gradients_match_finite_differences(name):
    """Every receiver kind's input gradient (via `receiver_hooks`, one backward) against a
    central difference on the HF module; the MLP's excludes its skip path."""
    model, oracle = load(ALL[name])
    graph = oracle.graph
    kv = "g" if graph.spec.grouped else "h"
    data = random_task(seq=6)
    metric = make_metric(data)
    inputs: dict[int, torch.Tensor] = {}

    def keep(columns: slice, n_up: int, x: torch.Tensor) -> torch.Tensor:
        inputs[columns.start] = x
        return x

    with frozen_parameters(model), torch.enable_grad():
        embed = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))]
        hooks = embed + receiver_hooks(model, graph, keep)
        logits = model.run_with_hooks(data.clean, fwd_hooks=hooks)
        starts = sorted(inputs)
        grads = dict(
            zip(
                starts,
                torch.autograd.grad(metric(logits), [inputs[c] for c in starts]),
                strict=True,
            )
        )
    eps = 1e-6
    for receiver in RECEIVERS:
        j = graph.receiver_index[receiver.replace("X", kv)]
        start = max(c for c in starts if c <= j)
        grad = grads[start][:, :, j - start] if grads[start].ndim == 4 else grads[start]
        gen = torch.Generator().manual_seed(j)
        u = torch.randn(*data.clean.shape, oracle.d, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            plus = float(metric(oracle.run(data.clean, {j: eps * u})[0]))
            minus = float(metric(oracle.run(data.clean, {j: -eps * u})[0]))
        fd = (plus - minus) / (2 * eps)
        analytic = float((grad * u).sum())
        assert abs(fd) > 1e-7, receiver
        assert math.isclose(analytic, fd, rel_tol=1e-5), (receiver, analytic, fd)


# ------------------------------------------------------------------------------ (c) EAP vs exact

EDGES = [
    ("input", "a0.h1.q"),
    ("a0.h0", "a1.X1.k"),
    ("m0", "a1.X0.v"),
    ("a0.h3", "m1"),
    ("input", "m0"),
    ("a1.h2", "logits"),
    ("m1", "logits"),
    ("input", "logits"),
]


@pytest.mark.parametrize("name", NAMES)
def test_exact_equals_patching_the_hf_module(name):
    """ctlens ``exact`` patches each edge exactly as hand patching the HF module does."""
    model, oracle = load(FAMILIES[name])
    graph = oracle.graph
    data = random_task(n=4, seq=6, seed=2)
    kv = "g" if graph.spec.grouped else "h"
    names = [(s, r.replace("X", kv)) for s, r in EDGES]
    if graph.spec.parallel_attn_mlp:  # a parallel block's MLP reads what its heads read
        with pytest.raises(ValueError, match="not a valid edge"):
            graph.edge_index("a1.h0", "m1")
    scores = ctlens.attribute(model, data, method="exact", ablation="corrupt", progress=False)
    metric = make_metric(data)
    with torch.no_grad():
        logits, clean = oracle.run(data.clean)
        _, corrupt = oracle.run(data.corrupt)
        base = float(metric(logits))
        for s_name, r_name in names:
            s, r = graph.edge_index(s_name, r_name)
            patched = float(metric(oracle.run(data.clean, {r: corrupt[s] - clean[s]})[0]))
            assert math.isclose(
                float(scores.scores[s, r]), patched - base, rel_tol=1e-5, abs_tol=1e-7
            ), (
                s_name,
                r_name,
            )


@pytest.mark.parametrize("name", ALL_NAMES)
def test_eap_tracks_exact_on_a_small_weight_model(name):
    """Where patching any edge is a small change, first-order scores are nearly exact."""
    model, oracle = load(ALL[name], scale=0.01)
    data = random_task(n=4, seq=6, seed=2)
    valid = oracle.graph.valid
    for ablation in ("corrupt", "mean"):
        kw = dict(ablation=ablation, progress=False)
        eap = ctlens.attribute(model, data, **kw).scores[valid]
        exact = ctlens.attribute(model, data, method="exact", **kw).scores[valid]
        corr = float(torch.corrcoef(torch.stack([eap, exact]))[0, 1])
        assert corr > 0.99, (ablation, corr)


# ------------------------------------------------------------------------------ (d) restriction


def expected_moves(
    oracle: HFOracle, circuit_edges: list[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """HF parameter name -> bool mask of the entries a restricted step may move."""
    f, m = oracle.f, oracle.m
    names = {mod: name for name, mod in m.named_modules()}
    state = dict(m.named_parameters())
    masks = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in state.items()}

    def allow(module: nn.Module, out: slice | None = None, inp: slice | None = None) -> None:
        """Open a module's output rows ``out`` (and bias) or input columns ``inp``."""
        prefix = names[module]
        w = masks[f"{prefix}.weight"]
        if out is not None:
            (w[:, out] if f.conv1d else w[out]).fill_(True)
            if f"{prefix}.bias" in masks:
                masks[f"{prefix}.bias"][out] = True
        if inp is not None:
            (w[inp] if f.conv1d else w[:, inp]).fill_(True)

    dh = oracle.dh
    for sender, receiver in circuit_edges:
        for node in (
            oracle.graph.sender_nodes[oracle.graph.sender_index[sender]],
            oracle.graph.receiver_nodes[oracle.graph.receiver_index[receiver]],
        ):
            block = oracle.blocks[node.layer] if node.layer is not None else None
            kind = node.kind.value
            if kind == "head":
                out = getattr(_get(block, f.attn), f.out_proj)
                allow(out, inp=slice(node.head * dh, (node.head + 1) * dh))
                if f"{names[out]}.bias" in masks:
                    masks[f"{names[out]}.bias"][:] = True
            elif kind in "qkv":
                proj, cols = oracle.qkv_columns(kind, node.head)
                allow(getattr(_get(block, f.attn), proj), out=cols)
            elif kind == "mlp" and node.name == receiver:
                for name in f.mlp_in:
                    allow(getattr(block.mlp, name), out=slice(None))
            elif kind == "mlp":
                allow(getattr(block.mlp, f.mlp_out), out=slice(None))
    return masks


@pytest.mark.parametrize("name", ALL_NAMES)
def test_restricted_step_moves_only_circuit_slices(name):
    """A restricted SGD step (momentum, weight decay) moves exactly the circuit's slices of
    the HF parameters: a head's rows of a fused qkv weight, never the whole weight."""
    model, oracle = load(ALL[name])
    graph = Graph.from_model(model)
    kv = "g" if graph.spec.grouped else "h"
    edges = [("input", "a1.h2.q"), ("a0.h1", f"a1.{kv}1.v"), ("m0", "m1"), ("a1.h3", "logits")]
    circuit = ctlens.Circuit.from_edges(graph, edges)
    expected = expected_moves(oracle, edges)
    before = {k: v.detach().clone() for k, v in hf_state_dict(model).items()}
    data = random_task(seq=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    with ctlens.restrict_gradients(model, circuit, optimizer=optimizer):
        for _ in range(2):
            optimizer.zero_grad()
            model(data.clean).logsumexp(-1).mean().backward()
            optimizer.step()
    after = hf_state_dict(model)
    assert set(expected) <= set(after)
    for key, now in after.items():
        allowed = expected.get(key, torch.zeros(now.shape, dtype=torch.bool))
        moved = now.detach() != before[key]
        assert not (moved & ~allowed).any(), f"{key} moved outside the circuit's slices"
        if allowed.any() and key.endswith("weight"):
            assert moved[allowed].float().mean() > 0.9, f"{key}: circuit slice did not move"


# ------------------------------------------------------------------------------ (e) export


@pytest.mark.parametrize("name", ALL_NAMES)
def test_export_after_training_loads_in_transformers(name, tmp_path):
    """A trained bridge exports to an HF directory with equal logits (GPT-NeoX's fused qkv
    is rebuilt from the bridge's q/k/v copies)."""
    model, _ = load(ALL[name])
    data = random_task(seq=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(data.clean).logsumexp(-1).mean().backward()
    optimizer.step()
    export_hf(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", local_files_only=True
    ).eval()
    assert type(reloaded) is type(model.original_model)
    with torch.no_grad():
        expected = model(TOKENS)
        trained = reloaded(TOKENS).logits
        approximate = "frozen-norm" if name in FROZEN else None
        again = ctlens.load_model(tmp_path / "out", approximate=approximate)(TOKENS)
    tol = 1e-10 if name == "gpt2" else 1e-6
    torch.testing.assert_close(trained, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(again, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ frozen-norm

FROZEN_NAMES = list(FROZEN)


@pytest.mark.parametrize("name", FROZEN_NAMES)
def test_frozen_norm_families_need_the_opt_in(name):
    with pytest.raises(
        UnsupportedModelError,
        match="normalises attention and MLP outputs.*approximate='frozen-norm'",
    ):
        ctlens.load_model(FROZEN[name].module())


def test_approximation_is_refused_where_it_does_not_apply():
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel is analysed exactly"):
        ctlens.load_model(tiny_gpt2_module(), approximate="frozen-norm")
    with pytest.raises(ValueError, match="unknown approximation 'frozen'"):
        ctlens.load_model(tiny_gpt2_module(), approximate="frozen")


@pytest.mark.parametrize("name", FROZEN_NAMES)
def test_frozen_norm_decomposition_is_exact(name):
    """Each head's share of its layer's normalised output: the shares of a layer sum to the
    normalised output, and input plus all shares is the final residual stream."""
    model, _ = load(FROZEN[name])
    graph = Graph.from_model(model)
    assert graph.spec.approximate == "frozen-norm"
    sent = torch.zeros(graph.n_senders, *TOKENS.shape, model.cfg.d_model, dtype=torch.float64)

    def record(rows: slice, act: torch.Tensor) -> None:
        sent[rows] += (act[:, :, None] if act.ndim == 3 else act).permute(2, 0, 1, 3)

    names = ["ln_final.hook_in"] + [f"blocks.{i}.ln1_post.hook_out" for i in range(2)]
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n in names)
        model.run_with_hooks(TOKENS, fwd_hooks=sender_hooks(model, graph, record))
    torch.testing.assert_close(sent.sum(0), cache["ln_final.hook_in"], rtol=0, atol=1e-12)
    for layer in range(2):
        shares = sent[graph.sender_slice(layer)].sum(0)
        out = cache[f"blocks.{layer}.ln1_post.hook_out"]
        torch.testing.assert_close(shares, out, rtol=0, atol=1e-12)
        assert float(sent[graph.sender_slice(layer)].std(0).mean()) > 1e-3  # not all equal


@pytest.mark.parametrize("name", FROZEN_NAMES)
def test_frozen_norm_masks_reproduce_the_reference_and_exact(name):
    """The empty circuit computes the corrupt run; dropping one edge under `edge_mask`
    changes the metric by that edge's `exact` score."""
    model, _ = load(FROZEN[name])
    graph = Graph.from_model(model)
    data = random_task(n=4, seq=6, seed=2)
    metric = make_metric(data)
    with torch.no_grad():
        clean, corrupt = model(data.clean), model(data.corrupt)
        with ctlens.edge_mask(model, ctlens.Circuit.empty(graph), "corrupt", data.corrupt):
            empty = model(data.clean)
    torch.testing.assert_close(empty, corrupt, rtol=1e-9, atol=1e-9)
    scores = ctlens.attribute(model, data, method="exact", ablation="corrupt", progress=False)
    assert scores.metadata["approximate"] == "frozen-norm"
    for edge in [("a0.h1", "a1.h2.q"), ("a0.h3", "m0"), ("a1.h0", "logits"), ("m0", "logits")]:
        s, r = graph.edge_index(*edge)
        keep = graph.valid.clone()
        keep[s, r] = False
        circuit = ctlens.Circuit(graph, keep)
        with torch.no_grad(), ctlens.edge_mask(model, circuit, "corrupt", data.corrupt):
            dropped = float(metric(model(data.clean)))
        expected = float(scores.scores[s, r])
        assert math.isclose(dropped - float(metric(clean)), expected, rel_tol=1e-4, abs_tol=1e-8)


def test_frozen_norm_is_recorded_in_circuit_files(tmp_path):
    model, _ = load(FROZEN["gemma2"])
    graph = Graph.from_model(model)
    circuit = ctlens.Circuit.from_edges(graph, [("a0.h1", "logits")])
    path = circuit.save(tmp_path / "circuit.json")
    assert '"approximate": "frozen-norm"' in path.read_text()
    back = ctlens.Circuit.load(path, model)
    assert back.graph.spec.approximate == "frozen-norm" and back.edges == circuit.edges
    assert "approximate" not in Graph(GraphSpec(2, 4, 2)).spec.to_dict()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_bfloat16_scores_track_float32(name):
    """Half precision works for every family: float32 score tensors, close to float32's."""
    module = ALL[name].module().float()
    approximate = "frozen-norm" if name in FROZEN else None
    data = random_task(seq=6)
    kw: dict = {"progress": False}
    full = ctlens.attribute(
        ctlens.load_model(copy.deepcopy(module), approximate=approximate), data, **kw
    )
    if name in ("olmo", "olmo2"):  # TL 4.3's OLMo bridges fail in half precision
        with pytest.raises(
            UnsupportedModelError, match="bfloat16.*load_model\\(..., dtype='float32'\\)"
        ):
            ctlens.load_model(module, dtype=torch.bfloat16, approximate=approximate)
        return
    half_model = ctlens.load_model(module, dtype=torch.bfloat16, approximate=approximate)
    half = ctlens.attribute(half_model, data, **kw)
    valid = full.graph.valid
    assert half.scores.dtype == torch.float32 and torch.isfinite(half.scores).all()
    corr = float(torch.corrcoef(torch.stack([half.scores[valid], full.scores[valid]]))[0, 1])
    assert corr > 0.95, corr


@pytest.mark.parametrize("build", [tiny_gpt2_module, tiny_llama_module])
def test_the_one_reader_of_the_bridges_hf_modules(build: Callable[..., nn.Module]) -> None:
    """`hf_component` / `output_axis` / `projection_xw` (what the gradient rules and the MLP
    groups read) give ``y = x W + b`` exactly as the HF module computes it, Linear or
    Conv1D; anything else is refused."""
    from ctlens.bridge.families import hf_component, output_axis, projection_xw

    model = ctlens.load_model(build(dtype=torch.float64))
    x = torch.randn(3, model.cfg.d_model, dtype=torch.float64)
    for name in ("in", "out"):
        component = getattr(model.blocks[0].mlp, name)
        module = hf_component(component, f"blocks[0].mlp.{name}")
        weight, bias = projection_xw(component, f"blocks[0].mlp.{name}")
        inputs = x if name == "in" else torch.randn(3, weight.shape[0], dtype=torch.float64)
        want = module(inputs)
        got = inputs @ weight + (0 if bias is None else bias)
        torch.testing.assert_close(got, want)
        axis = output_axis(module, name)
        assert module.weight.shape[axis] == want.shape[-1]
    with pytest.raises(ValueError, match="blocks.0..ln2 is a .*nn.Linear and transformers' Conv1D"):
        output_axis(hf_component(model.blocks[0].ln2, "blocks[0].ln2"), "blocks[0].ln2")
    with pytest.raises(ValueError, match="x exposes no original_component"):
        hf_component(object(), "x")
