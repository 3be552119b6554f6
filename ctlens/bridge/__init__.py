"""The bridge layer: what ctlens knows about TransformerLens 4 bridges and HF model families.

Everything model-specific lives here, so that the graph, attribution, masking and tuning
stages never spell a hook name or reach into an HF module themselves:

- `ctlens.bridge.names`: the hook each graph node writes or reads (`HookLayout`,
  `HookRef`, `node_hook`); depends on the shared types alone, so `ctlens.graph` uses it.
- `ctlens.bridge.families`: the architecture tables (supported, frozen-norm, refused),
  the hooks a loaded bridge must fire, and the fused q/k/v facts (GPT-2's views, GPT-NeoX's
  copies).
- `ctlens.bridge.mlp_groups`: an MLP's projections in ``x @ W`` orientation and the hooks
  that make its neuron groups senders and receivers.
- `ctlens.bridge.hooks`: forward hooks over a `ctlens.graph.Graph` that hand sender
  outputs and receiver inputs to a callback, and the model-state context managers
  (`eval_mode`, `frozen_parameters`). It sits above the graph in the layer order
  (tests/test_tree_rules.py); the other three sit below it.
"""
