"""Adapters saved by the code before the one adapter model (commit 358d364), for tests/test_every_method.py's check
that old adapters still load (bit-equal outputs on the machine that wrote them).

    git worktree add /tmp/old 358d364
    PYTHONPATH=/tmp/old/src python tests/data/old_adapters/make_old_adapters.py save tests/data/old_adapters
    python tests/data/old_adapters/make_old_adapters.py load tests/data/old_adapters   # with today's code
"""
import os
import sys

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
from conftest import make_bert
import hyperadalora as ha
mode, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x = torch.randint(0, 100, (2, 7))
cfgs = {"hyperadalora": lambda: ha.HyperAdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["query", "value"], task_type="SEQ_CLS"),
        "hyperlora": lambda: ha.HyperLoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
        "hyperhydralora": lambda: ha.HyperHydraLoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")}
res = {}
for name, cfg in cfgs.items():
    d = f"{out}/{name}"
    if mode == "save":
        m = ha.get_peft_model(make_bert(), cfg())
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m.train()
        for step in range(1, 4):
            loss = m(input_ids=x, labels=torch.tensor([0, 1])).loss
            loss.backward(); opt.step(); m.update_and_allocate(step) if name == "hyperadalora" else m.after_optimizer_step(step); opt.zero_grad()
        m.eval()
        m.save_pretrained(d)
        with torch.no_grad():
            torch.save(m(input_ids=x).logits, f"{d}/logits.pt")
    else:
        m = ha.load_adapter(make_bert(), d)
        m.eval()
        with torch.no_grad():
            got = m(input_ids=x).logits
        ref = torch.load(f"{d}/logits.pt")
        print(name, type(m).__name__, "bit-equal" if torch.equal(got, ref) else f"max diff {(got-ref).abs().max()}")
