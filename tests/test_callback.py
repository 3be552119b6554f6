"""CircuitTuningCallback: HF Trainer + the callback equals CircuitTuner(discovery="task")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

import ctlens
from ctlens.callback import BridgeCausalLM, CircuitTuningCallback
from ctlens.tuning import weights

CONFIG = dict(
    mode="gradient", discovery="task", top_n=20, every_k=2, steps=4, batch_size=8,
    discovery_batches=1, discovery_ablation="mean", lr=3e-3, weight_decay=0.01,
    grad_clip=0.5, lr_schedule="constant", eval_every=100, save_every=100, export=False,
    progress=False, eval_examples=8, seed=0,
)


def _task() -> ctlens.tasks.Task:
    return ctlens.tasks.load("agreement", n=32, n_train=40, n_general=8)


def _tuner_rows(step: int, n: int, batch: int, seed: int) -> list[int]:
    """CircuitTuner's batch order: a seeded permutation per epoch, cycled."""
    rows: list[int] = []
    start = step * batch
    while len(rows) < batch:
        epoch, offset = divmod(start + len(rows), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.extend(perm[offset : offset + batch - len(rows)].tolist())
    return rows


class _Rows(torch.utils.data.IterableDataset):
    """The training rows in the tuner's order, with labels -100 outside the targets."""

    def __init__(self, task: ctlens.tasks.Task, steps: int, batch: int, seed: int) -> None:
        self.task, self.steps, self.batch, self.seed = task, steps, batch, seed

    def __iter__(self):
        tokens, target = self.task.train_tokens, self.task.train_target_mask
        for step in range(self.steps):
            for row in _tuner_rows(step, len(tokens), self.batch, self.seed):
                yield {"input_ids": tokens[row],
                       "labels": tokens[row].masked_fill(~target[row], -100)}


def _trainer_run(tmp_path: Path, family: str) -> tuple[dict[str, torch.Tensor], list]:
    cfg = ctlens.TuneConfig(**CONFIG)
    model = ctlens.load_model(f"zoo:tiny-{family}")
    task = _task()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size, max_grad_norm=cfg.grad_clip,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = CircuitTuningCallback(model, task, cfg)
    Trainer(
        model=BridgeCausalLM(model), args=args,
        train_dataset=_Rows(task, cfg.steps, cfg.batch_size, cfg.seed),
        optimizers=(optimizer, scheduler), callbacks=[callback],
    ).train()
    assert callback._stack is None  # restriction lifted at the end
    return weights.unique_state_dict(model), callback.history


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trainer_callback_matches_circuit_tuner(tmp_path: Path, family: str) -> None:
    base = weights.unique_state_dict(ctlens.load_model(f"zoo:tiny-{family}"))
    base = {k: v.clone() for k, v in base.items()}
    tuned_model = ctlens.load_model(f"zoo:tiny-{family}")
    ctlens.CircuitTuner(tuned_model, _task(), ctlens.TuneConfig(**CONFIG)).run(tmp_path / "run")
    tuned = weights.unique_state_dict(tuned_model)
    trained, history = _trainer_run(tmp_path, family)

    assert [step for step, _ in history] == [0, 2]
    assert set(trained) == set(tuned)
    moved = 0
    for key, value in tuned.items():
        assert torch.allclose(trained[key], value, atol=1e-5, rtol=0), key
        moved += int((value != base[key]).sum())
        # frozen entries stay bit-identical in both runs
        same = tuned[key] == base[key]
        assert torch.equal(trained[key][same], base[key][same]) or not same.any(), key
    assert moved > 0


def test_callback_refuses_bad_input() -> None:
    model = ctlens.load_model("zoo:tiny-gpt2")
    task = _task()
    with pytest.raises(ValueError, match="restricts gradients only"):
        CircuitTuningCallback(model, task, ctlens.TuneConfig(mode="forward"))
    with pytest.raises(TypeError, match="TaskData"):
        CircuitTuningCallback(model, task.train_tokens)
    with pytest.raises(ValueError, match="larger than the model's graph"):
        CircuitTuningCallback(model, task, ctlens.TuneConfig(top_n=10**7))


def test_bridge_causal_lm_loss_matches_the_tuner_loss() -> None:
    model = ctlens.load_model("zoo:tiny-gpt2")
    task = _task()
    tokens, target = task.train_tokens[:6], task.train_target_mask[:6]
    out = BridgeCausalLM(model)(tokens, labels=tokens.masked_fill(~target, -100))
    logp = model(tokens)[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    expected = (nll * target[:, 1:]).sum() / target[:, 1:].sum()
    assert torch.allclose(out.loss, expected)
    assert BridgeCausalLM(model)(tokens).loss is None


def test_callback_selects_as_the_tuner_does() -> None:
    """The callback keeps the tuner's selection rule: with ``selection="top_nodes"`` its
    circuit is the top N by |score| x sender's summed |scores| x receiver's summed |scores|
    (computed here by hand), and with ``ema`` the second circuit ranks the averaged scores."""
    from ctlens.tuning.discovery import task_scores
    from ctlens.tuning.distributed import World

    model = ctlens.load_model("zoo:tiny-gpt2")
    task = _task()
    cfg = ctlens.TuneConfig(**{**CONFIG, "selection": "top_nodes", "ema": 0.5})
    callback = CircuitTuningCallback(model, task, cfg)
    graph = callback.graph
    first = callback.discover(0)
    second = callback.discover(2)
    raw = [task_scores(model, task.discovery, cfg, graph, t, World()).float().cpu()
           for t in (0, 2)]
    for circuit, scores in ((first, raw[0]), (second, 0.5 * raw[0] + 0.5 * raw[1])):
        magnitude = scores.abs() * graph.valid
        rank = magnitude * magnitude.sum(1, keepdim=True) * magnitude.sum(0, keepdim=True)
        top = rank.flatten().topk(cfg.top_n).indices
        want = {(graph.senders[int(i) // graph.n_receivers],
                 graph.receivers[int(i) % graph.n_receivers]) for i in top}
        assert set(circuit.edges) == want
        assert circuit.metadata["selection"] == "top_nodes"
        assert circuit.metadata["discovery"] == "task"
