"""HyperAdaLoRA on a 4-bit (bitsandbytes nf4) base, QLoRA-style, with gradient checkpointing
(pip install 'hyperadalora[quant]'; bitsandbytes >= 0.50 runs on CPUs too).

    python examples/quantized.py --steps 50
"""
import argparse

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--model", default="minilm", help="a model directory, or minilm (all-MiniLM-L6-v2)")
cli = parser.parse_args()

# --8<-- [start:example]
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

import hyperadalora as ha
from hyperadalora import data
from hyperadalora.base_models import resolve_model_path

steps = cli.steps
path = resolve_model_path(cli.model, "classification")
tokenizer = AutoTokenizer.from_pretrained(path)
base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["classifier", "pooler"]))
model = ha.get_peft_model(base, ha.HyperAdaLoraConfig(init_r=3, target_r=1, target_modules=["query", "value"],
                                                      total_step=steps, tinit=steps // 10, tfinal=steps // 5,
                                                      task_type="SEQ_CLS"))  # adapters and hypernetworks in fp32
model.gradient_checkpointing_enable()       # non-reentrant: same losses, less memory
examples = data.load_examples("sentiment", "train", max_examples=16 * steps)
loader = data.make_dataloader(data.build_classification_dataset(examples, tokenizer, max_length=64), 16,
                              shuffle=True, seed=0, collate_fn=data.make_collator(tokenizer))
optimizer = torch.optim.AdamW(model.optimizer_param_groups(lr=1e-3))
for step, batch in zip(range(1, steps + 1), loader):
    model(**batch).loss.backward()
    optimizer.step()
    model.update_and_allocate(step)
    optimizer.zero_grad()
merged = model.merge_and_unload(dequantize=True)   # a quantized base is merged only dequantized
print(model.total_rank)
# --8<-- [end:example]
