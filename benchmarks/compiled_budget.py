"""The compiled back end at 1/4 on one of speed.py's models: the bytes its forward keeps for
backward (the storages ``saved_tensors_hooks`` sees, less the parameters', buffers' and inputs')
against the sum of its plans' budgets, after two steps. One JSON line; one process per model:

    for m in resnet18_b32 mobilenet_v2_b16 convnext_tiny_b16 vit_small gpt2_small; do
        python benchmarks/compiled_budget.py $m; done
"""
import json
import os
import sys

import torch

import actcompile

sys.path.insert(0, os.path.dirname(__file__))
import speed  # noqa: E402  (benchmarks/speed.py: the same models, inputs and loss)


name = sys.argv[1]
torch.manual_seed(0)
model, inputs, loss = speed.build(name)
params = [p for p in model.parameters() if p.requires_grad]
be = actcompile.backend(budget=0.25)
compiled = torch.compile(model, backend=be)
for _ in range(2):
    speed.step(compiled, params, inputs, loss)
seen = {}

def pack(t):
    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    out = speed.call(compiled, inputs)
xs = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
anyway = {t.untyped_storage().data_ptr() for t in [*xs, *model.parameters(), *model.buffers()]}
held = sum(n for p, n in seen.items() if p not in anyway)
planned = sum(p.planned_bytes for p in be.plans)
print(json.dumps(dict(model=name, saved_held=held, planned=planned,
                      budget=sum(p.budget_bytes for p in be.plans), baselines=[p.baseline_bytes for p in be.plans])))
