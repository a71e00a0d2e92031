"""HyperAdaLoRA with TRL: `HyperAdaLoraSFTTrainer` is TRL's SFTTrainer with HyperAdaLoRA's optimizer groups, rank
allocation and saving (pip install 'hyperadalora[trl]'). SmolLM2-135M-Instruct on Alpaca-style data.

    python examples/trl_sft.py --steps 200 --data path/to/alpaca.json
"""
import argparse
from pathlib import Path

# the Alpaca demo set of this project's shared data, found from this file (not from the current directory)
DEMO = Path(__file__).resolve().parents[1].parent / "shared/data/instruct/alpaca/alpaca_en_demo.json"
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--model", default="smollm2", help="a causal LM directory, or smollm2")
parser.add_argument("--data", default=str(DEMO), help="Alpaca-style JSON / JSONL (instruction, input, output)")
parser.add_argument("--output-dir", default="runs/trl-sft")
cli = parser.parse_args()
if not Path(cli.data).is_file():
    parser.error(f"--data {cli.data}: no such file (an Alpaca-style JSON or JSONL file)")

# --8<-- [start:example]
import torch
from datasets import Dataset
from trl import SFTConfig

import hyperadalora as ha
from hyperadalora import data
from hyperadalora.base_models import load_model_and_tokenizer

steps = cli.steps
base, tokenizer, _ = load_model_and_tokenizer(cli.model, "instruction")
examples = data.load_examples("alpaca", "train", path=cli.data)
train = Dataset.from_list([{"prompt": data.format_prompt(e), "completion": e["output"]} for e in examples])
cfg = ha.HyperAdaLoraConfig(init_r=4, target_r=2, total_step=steps, tinit=steps // 10, tfinal=steps // 5, deltaT=2,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            task_type="CAUSAL_LM")
model = ha.get_peft_model(base, cfg)
args = SFTConfig(cli.output_dir, max_steps=steps, learning_rate=1e-3, per_device_train_batch_size=4, max_length=256,
                 logging_steps=max(1, steps // 10), report_to="none",  # completion-only loss (prompt-completion data)
                 bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())
trainer = ha.HyperAdaLoraSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
trainer.train()                             # rank allocation and the hypernetworks' learning rates included
trainer.save_model(f"{cli.output_dir}/adapter")
print(model.total_rank)
# --8<-- [end:example]
