"""The shared string enums (`ctlens.types`): closed sets that behave as their strings."""

from __future__ import annotations

import json

import pytest

from ctlens.tuning import TuneConfig
from ctlens.types import Ablation, Loss, Mode, Optimizer, Selection, Shard, parse_choice


@pytest.mark.parametrize("kind", [Mode, Selection, Optimizer, Loss, Shard])
def test_members_behave_as_their_strings(kind: type) -> None:
    for member in kind:
        text = member.value
        assert member == text and hash(member) == hash(text)
        # argparse renders a default with "%s" (the ``ctlens tune --help`` text)
        assert str(member) == f"{member}" == "%s" % member == text  # noqa: UP031
        assert json.dumps({"x": member}) == json.dumps({"x": text})
        assert {text: 1}[member] == 1
        assert parse_choice(kind, text, "option") is member
        assert parse_choice(kind, member, "option") is member


def test_parse_choice_names_the_option_and_every_choice() -> None:
    with pytest.raises(ValueError, match="^mode must be one of 'gradient', 'forward', 'both', "
                                         "'full', 'random', 'lora'; got 'grad'$"):
        parse_choice(Mode, "grad", "mode")
    with pytest.raises(ValueError, match="got 3"):
        parse_choice(Loss, 3, "loss")


def test_mode_families() -> None:
    assert [m.value for m in Mode if m.uses_circuit] == ["gradient", "forward", "both",
                                                         "random"]
    assert [m.value for m in Mode if m.restricts_gradients] == ["gradient", "both", "random"]
    assert [m.value for m in Mode if m.masks_forward] == ["forward", "both"]


def test_tune_config_converts_once_and_writes_the_strings() -> None:
    """`TuneConfig` holds members whichever spelling it was given; its dict (``run.json``'s
    ``config``) is the strings', and reads back to an equal config."""
    config = TuneConfig(mode="forward", selection="top_nodes", optimizer="sgd",
                        loss="sequence", discovery_ablation="corrupt", shard=None)
    assert config.mode is Mode.FORWARD and config.selection is Selection.TOP_NODES
    assert config.optimizer is Optimizer.SGD and config.loss is Loss.SEQUENCE
    assert config.discovery_ablation is Ablation.CORRUPT
    same = TuneConfig(mode=Mode.FORWARD, selection=Selection.TOP_NODES,
                      optimizer=Optimizer.SGD, loss=Loss.SEQUENCE,
                      discovery_ablation=Ablation.CORRUPT)
    assert same == config
    assert all(type(v) is str for k, v in config.to_dict().items()
               if k in ("mode", "selection", "optimizer", "loss", "discovery_ablation"))
    text = json.dumps(config.to_dict())
    assert '"mode": "forward"' in text and '"discovery_ablation": "corrupt"' in text
    assert TuneConfig.from_dict(json.loads(text)) == config
    assert TuneConfig(shard="fsdp").shard is Shard.FSDP
    with pytest.raises(ValueError, match="discovery_ablation must be one of 'corrupt', "
                                         "'mean', 'zero'; got 'average'"):
        TuneConfig(discovery_ablation="average")
