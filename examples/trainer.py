"""HyperAdaLoRA with transformers' Trainer: `HyperAdaLoraTrainer` adds the optimizer groups, rank allocation and
adapter-only checkpoints.

    python examples/trainer.py --steps 100
"""
import argparse

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--model", default="minilm", help="a model directory, or minilm (all-MiniLM-L6-v2)")
parser.add_argument("--output-dir", default="runs/trainer")
cli = parser.parse_args()

# --8<-- [start:example]
from transformers import TrainingArguments

import hyperadalora as ha
from hyperadalora import data
from hyperadalora.base_models import load_model_and_tokenizer

steps = cli.steps
base, tokenizer, _ = load_model_and_tokenizer(cli.model, "classification", num_labels=2)
train = data.build_classification_dataset(data.load_examples("sentiment", "train", max_examples=16 * steps),
                                          tokenizer, max_length=64)
cfg = ha.HyperAdaLoraConfig(init_r=3, target_r=1, target_modules=["query", "value"], total_step=steps,
                            tinit=steps // 10, tfinal=steps // 5, task_type="SEQ_CLS")
model = ha.get_peft_model(base, cfg)
args = TrainingArguments(cli.output_dir, max_steps=steps, learning_rate=1e-3, per_device_train_batch_size=16,
                         logging_steps=max(1, steps // 5), save_steps=steps, report_to="none", use_cpu=True)
trainer = ha.HyperAdaLoraTrainer(model=model, args=args, train_dataset=train,
                                 data_collator=data.make_collator(tokenizer))
trainer.train()                             # logs loss, lr and total_rank; per-layer ranks go to report_to
trainer.save_model(f"{cli.output_dir}/adapter")   # ha.load_adapter(fresh_base, ".../adapter") reads it
print(model.total_rank)
# --8<-- [end:example]
