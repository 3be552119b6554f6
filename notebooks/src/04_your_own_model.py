# ruff: noqa: E402, B018
# %% [markdown]
# # Your own model, your own task
#
# The zoo models are there so that everything runs offline in seconds. Your research is
# about *your* model and *your* task. This notebook shows the three ways in:
#
# 1. a model from the **HuggingFace Hub** (`ctlens.load_model("gpt2")`): the code is shown
#    and runs when the Hub is reachable; offline it is skipped;
# 2. **your own HF model**, built (or trained, or fine-tuned) in Python: any
#    `GPT2LMHeadModel` or `LlamaForCausalLM` instance, or a directory it was saved to;
# 3. **your own task** as a JSONL file of prompt pairs.

# %%
import json
import os
import random
import socket
import tempfile
from pathlib import Path

import plotly.io as pio
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ctlens
from ctlens import tasks, zoo  # task bundles and the model zoo
from ctlens.tuning import export_hf

pio.renderers.default = "plotly_mimetype+notebook"
torch.manual_seed(0)
torch.set_num_threads(1)  # the models here are tiny: one CPU thread is the fastest
workdir = Path(tempfile.mkdtemp(prefix="ctlens-own-"))

# %% [markdown]
# ## 1. A model from the Hub
#
# `ctlens.load_model("gpt2")` downloads GPT-2 small and wraps it as a TransformerLens 4
# bridge with ctlens's hooks (157 senders, 445 receivers, 32,491 edges). We first check,
# without waiting on a network timeout, whether the Hub can be reached: the usual offline
# switches (`HF_HUB_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1`) skip it at once, and otherwise a
# 2-second connection attempt decides.

# %%
def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


online = hub_reachable()
print("HuggingFace Hub reachable:", online)

# %% [markdown]
# With a GPT-2 tokenizer (byte-pair encoding), answers are tokenized as the *continuation*
# of the prompt, so `" is"` with its leading space is one token; `TaskData.from_prompts`
# handles that and checks that each clean/corrupt pair has the same token length.

# %%
if online:
    gpt2 = ctlens.load_model("gpt2")
    hub_data = ctlens.TaskData.from_prompts(
        gpt2.tokenizer,
        prompts=["The key to the cabinets", "The keys to the cabinet", "The author of the books",
                 "The authors of the book"],
        corrupt_prompts=["The keys to the cabinets", "The key to the cabinet",
                         "The authors of the books", "The author of the book"],
        answers=["is", "are", "is", "are"],
        wrong_answers=["are", "is", "are", "is"],
    )
    hub_scores = ctlens.attribute(gpt2, hub_data, method="eap", progress=False)
    print(hub_scores.graph)
    for s, r, v in hub_scores.top(5):
        print(f"{s:>7} -> {r:<10} {v:+.3f}")
else:
    print("offline: skipped loading gpt2 from the Hub")

# %% [markdown]
# ## 2. Your own task as JSONL
#
# A task file has one JSON object per line with four fields:
#
# - `prompt`: the clean prompt;
# - `corrupt_prompt`: a minimal change of it with the same number of tokens, which should
#   change the answer;
# - `answer`: the correct next token on the clean prompt;
# - `wrong_answer`: the competing token (the metric is `logit(answer) - logit(wrong)`).
#
# We write a small *object-location* task in the words the zoo tokenizer knows: two people
# go to two places, then we ask where one of them was. The corrupt prompt asks about the
# other person, so the right answer swaps.

# %%
rng = random.Random(0)
names = ["mary", "john", "anna", "paul", "lisa", "mark", "sarah", "david", "emma", "james"]
places = ["store", "school", "garden", "station", "market", "beach", "office", "library"]


def write_task(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.sample(names, 2)
            p, q = rng.sample(places, 2)
            story = f"{a} went to the {p} and {b} went to the {q} . then"
            f.write(json.dumps({"prompt": f"{story} {a} was at the",
                                "corrupt_prompt": f"{story} {b} was at the",
                                "answer": p, "wrong_answer": q}) + "\n")
    return path


write_task(workdir / "where.jsonl", 128)
write_task(workdir / "where_test.jsonl", 48)  # held out, for later
print((workdir / "where.jsonl").read_text().splitlines()[0])

# %% [markdown]
# `tasks.load(path, tokenizer=...)` reads the file into a full task bundle (discovery data,
# training rows and evaluation sets), checking every line: a missing field, an answer that
# is not one token, a clean/corrupt length mismatch or an unknown word is an error that
# names the line. `TaskData.from_jsonl` reads just the prompt pairs.

# %%
tok = zoo.tokenizer()
where = tasks.load(str(workdir / "where.jsonl"), tokenizer=tok)
print(where.description, "| evaluation sets:", list(where.evals))
data = where.discovery
print(tok.decode(data.clean[0][data.attention_mask[0]]), "->", tok.decode(data.correct[0]))

# %% [markdown]
# A line with a word the tokenizer does not know is refused with its line number, instead
# of silently becoming `<unk>`:

# %%
bad = workdir / "bad.jsonl"
bad.write_text(json.dumps({"prompt": "the zebra went to the", "corrupt_prompt":
                           "the dog went to the", "answer": "park", "wrong_answer": "store"}))
try:
    tasks.load(str(bad), tokenizer=tok)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# Can the zoo model do this task it was never trained on? Before looking for a circuit,
# check the metric on the clean and the corrupt prompts: a model that solves the task has
# a clearly positive logit difference on the clean prompts and a negative one on the
# corrupt prompts (there the right answer is the other place).

# %%
model = ctlens.load_model("zoo:tiny-llama")
scores = ctlens.attribute(model, data, progress=False)
clean, corrupt = scores.metadata["metric_clean"], scores.metadata["metric_corrupt"]
print(f"logit difference: clean {clean:+.2f}, corrupt {corrupt:+.2f}")
if clean > 1 and corrupt < -1:
    print("the zoo model does this task: its circuit can be searched for")
elif max(abs(clean), abs(corrupt)) < 0.5:
    print("both are close to 0: the zoo model cannot do this task")
else:
    print("neither clearly solved nor at 0: look at more prompts before trusting a circuit")

# %% [markdown]
# When both are close to 0, the model cannot tell which place goes with which name: it
# never saw this construction. A circuit search would then be meaningless (faithfulness
# divides by `M_full - M_empty`, which is about 0), and we need a model that does the task.

# %% [markdown]
# ## 3. Your own HF model
#
# Any supported HuggingFace module works: build it (here a 2-layer Llama with grouped-query
# attention: 4 query heads share 2 key/value heads), load a checkpoint into it, or
# fine-tune it, then hand the module to `ctlens.load_model`. The tokenizer is attached with
# `tokenizer=`; `dtype=` and `device=` are optional.

# %%
hf_config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
mine = LlamaForCausalLM(hf_config)
bridge = ctlens.load_model(mine, tokenizer=tok)
own_graph = ctlens.Graph.from_model(bridge)
print(own_graph)
print("k/v receivers are per KV group:", [r for r in own_graph.receivers if r.endswith(".k")])

# %% [markdown]
# A model directory (config, weights and tokenizer, as `save_pretrained` writes them)
# loads the same way. One caveat: the bridge wraps the HF module *in place*, so after
# `load_model(mine)` save with `ctlens.tuning.export_hf(bridge, path)`, which writes a plain
# HF directory (with the tokenizer), not with `mine.save_pretrained`.

# %%
export_hf(bridge, workdir / "mine")
print(sorted(p.name for p in (workdir / "mine").iterdir()))
reloaded = ctlens.load_model(workdir / "mine")
print(ctlens.Graph.from_model(reloaded) == own_graph)

# %% [markdown]
# A freshly initialised model knows nothing, so its metric should be near 0 (the cell prints
# it before and after training). Train it on the task's
# training rows, here with the tuner's `mode="full"` (plain fine-tuning of every
# parameter; any training loop of your own works as well). Then attribute it on the
# *held-out* file, read with `TaskData.from_jsonl`, so that we measure what it learned, not
# what it memorised.

# %%
test = ctlens.TaskData.from_jsonl(workdir / "where_test.jsonl", tokenizer=tok)
before = ctlens.attribute(bridge, test, progress=False).metadata["metric_clean"]
config = ctlens.TuneConfig(mode="full", steps=150, batch_size=16, lr=3e-3, eval_every=50,
                           eval_examples=48, export=False, progress=False,
                           top_n=40)  # the size of the circuit snapshots it records
ctlens.CircuitTuner(bridge, where, config).run(workdir / "train-mine")
after = ctlens.attribute(bridge, test, progress=False)
learned = after.metadata["metric_clean"]
print(f"held-out logit difference: before training {before:+.2f}, after {learned:+.2f}")
print("the trained model does the task on held-out prompts" if learned > 1
      else "the model has not learned the task yet: train longer before reading its circuit")

# %% [markdown]
# Once the model does the task, its circuit means something: select the strongest edges,
# check their faithfulness on the held-out prompts, and draw them. How does a 2-layer model
# bind a name to its place?

# %%
own_circuit = ctlens.Circuit.from_scores(after, top_n=20, prune=True)
faith = ctlens.faithfulness(bridge, test, own_circuit).faithfulness
print(own_circuit, f"faithfulness {faith:.2f}")
ctlens.viz.plot_circuit(own_circuit, title="where-was-X circuit in your own model")

# %% [markdown]
# ## Where next
#
# - The documentation's *Concepts* page explains the graph, the sign convention and the
#   ablations; its *Common errors* page lists the messages you may meet, with their fixes.
# - `ctlens discover --model PATH --task my_task.jsonl` runs attribution from a shell on a
#   model directory and a JSONL task.
