"""HyperAdaLoRA from Python, in a plain PyTorch loop: MiniLM on the embedded tweet-sentiment data (offline).

    python examples/python_api.py --steps 100          # about a minute on a laptop CPU
"""
import argparse

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--model", default="minilm", help="a model directory, or minilm (all-MiniLM-L6-v2)")
parser.add_argument("--output-dir", default="runs/python-api")
cli = parser.parse_args()

# --8<-- [start:example]
import torch

import hyperadalora as ha
from hyperadalora import data
from hyperadalora.base_models import load_model_and_tokenizer

steps = cli.steps
base, tokenizer, _ = load_model_and_tokenizer(cli.model, "classification", num_labels=2)
examples = data.load_examples("sentiment", "train", max_examples=16 * steps)
loader = data.make_dataloader(data.build_classification_dataset(examples, tokenizer, max_length=64), 16,
                              shuffle=True, seed=0, collate_fn=data.make_collator(tokenizer))

cfg = ha.HyperAdaLoraConfig(init_r=3, target_r=1, target_modules=["query", "value"], total_step=steps,
                            tinit=steps // 10, tfinal=steps // 5, deltaT=10, task_type="SEQ_CLS")
model = ha.get_peft_model(base, cfg)        # any transformers model; the classifier head trains too
optimizer = torch.optim.AdamW(model.optimizer_param_groups(lr=1e-3))  # the hypernetworks' own lrs
def batches():                             # the loader's batches, epoch after epoch
    while True:
        yield from loader


for step, batch in zip(range(1, steps + 1), batches()):
    out = model(**batch)                    # out.loss includes the orthogonal regulariser
    out.loss.backward()
    optimizer.step()
    model.update_and_allocate(step)         # after optimizer.step(), before zero_grad()
    optimizer.zero_grad()
print(f"loss {out.loss.item():.3f}, total rank {model.total_rank}")
model.save_pretrained(f"{cli.output_dir}/adapter")   # P, lambda, Q sliced to the kept ranks
model.export_lora(f"{cli.output_dir}/lora")          # a plain peft LoRA adapter, for serving
merged = model.merge_and_unload()                    # a plain transformers model, same outputs
# --8<-- [end:example]
