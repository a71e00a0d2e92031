"""One process of the Trainer FSDP tests (tests/test_fsdp_trainer.py), or their single-process reference.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_trainer_worker.py OUT --fsdp
    accelerate launch --config_file benchmarks/accelerate_fsdp2.yaml tests/fsdp_trainer_worker.py OUT
    python tests/fsdp_trainer_worker.py OUT                         (the single-process reference)

Trains each case given (--cases; default `CASES`) for `STEPS` optimizer steps with a global batch of `GLOBAL_BATCH`
examples, in ``OUT/<case>``: HyperAdaLoRA and peft's AdaLoRA under `HyperAdaLoraTrainer` on a tiny Llama (tests/
conftest.py `make_llama`: its decoder layers are the FSDP units) with fixed-length random token sequences, and
HyperAdaLoRA under `HyperAdaLoraSFTTrainer` on a few short texts; the Trainer's cases evaluate before and after
training. ``--fsdp``: FSDP through TrainingArguments (``fsdp=True, fsdp_config={"fsdp_version": 2, ...}``); under
``accelerate launch`` with an FSDP config, accelerate's own environment turns it on. ``--resume``: continue each case
from its checkpoint (`RESUME_AT`) into ``OUT/<case>/resumed``. Writes ``OUT/<case>/process-<rank>[-resumed].pt``:
the loss of every optimizer step (the mean over the processes, exactly), the evaluation losses, the rank allocation
after every step, this process's share of the base model (``trainer.fsdp_info``) and a digest of the trained state;
checkpoints every `SAVE_STEPS` steps (peft's AdaLoRA: every step) and ``save_model`` into ``OUT/<case>/final``.

On the CPU accelerate 1.15 never enables FSDP (accelerate/state.py sets ``DistributedType.FSDP`` and keeps the
FSDP plugin only for GPUs and other accelerators; a multi-process CPU run stays ``MULTI_CPU``, i.e. DDP, and drops the
plugin). `enable_fsdp_on_the_cpu` makes AcceleratorState keep the plugin on the CPU too, setting the two attributes
accelerate sets on a GPU, so that the Trainer's FSDP path runs on 2 CPU processes (gloo). It is the only thing here that
is not what a user runs.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = ["trainer-hyperadalora", "trainer-adalora", "sft-hyperadalora"]
STEPS = 6
GLOBAL_BATCH = 4
SAVE_STEPS = 3
# the checkpoint --resume continues from: peft's AdaLoRA from step 1, before its first masking step. Trainer saves a
# peft model with peft's save_pretrained, which cuts the adapter to the rank pattern once there is one, and its resume
# loads that into the full-rank model: a size mismatch (without FSDP too; HyperAdaLoraTrainer resumes this package's
# models from training_state.safetensors instead)
RESUME_AT = {"trainer-hyperadalora": SAVE_STEPS, "trainer-adalora": 1}
SEQ = 12
VOCAB = 128
# micro-batches per optimizer step (the same in one process and in two): the Trainer's HyperAdaLoRA case runs FSDP's
# no_sync micro-batch, then the all_reduce (its sensitivity is the whole step's either way)
ACCUMULATION = {"trainer-hyperadalora": 2}
# the orthogonal regulariser's weight: its default in every case (HyperAdaLoraTrainer counts it once per optimizer step
# whatever the processes and micro-batches, callbacks._penalty_factor; HyperAdaLoraSFTTrainer adds it itself)
ORTH_REG_WEIGHT = 0.1
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def enable_fsdp_on_the_cpu() -> None:
    """Let accelerate's FSDP plugin through on the CPU (see the module's docstring)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def tokenizer():
    from transformers import AutoTokenizer

    from hyperadalora.base_models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def base_model(case: str, tok=None):
    from conftest import make_llama

    return make_llama(vocab=tok.vocab_size if case.startswith("sft") else VOCAB)


def adapter_config(method: str, orth_reg_weight: float):
    import peft

    import hyperadalora as ha

    schedule = dict(init_r=3, target_r=1, total_step=STEPS, tinit=1, tfinal=2, deltaT=1, target_modules=TARGETS,
                    task_type="CAUSAL_LM", orth_reg_weight=orth_reg_weight)
    if method == "hyperadalora":
        return ha.HyperAdaLoraConfig(**schedule, hypernet="mlp", hypernet_dim=16, importance="sensitivity")
    return peft.AdaLoraConfig(**schedule)


def wrapped_model(case: str, tok=None):
    import peft

    import hyperadalora as ha

    method = case.split("-", 1)[1]
    model, config = base_model(case, tok), adapter_config(method, ORTH_REG_WEIGHT)
    return ha.get_peft_model(model, config) if method == "hyperadalora" else peft.get_peft_model(model, config)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences of one length (every example has as many labelled tokens)."""

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


def texts():
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    return [f"the film was {words[i % 6]} and the cast was {words[(i * 5) % 6]} too" for i in range(32)]


def recording(cls):
    """``cls`` recording the loss of every micro-batch (``training_step``'s return value) by optimizer step."""

    class Recording(cls):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.micro_losses.setdefault(self.state.global_step + 1, []).append(float(loss.detach()))
            return loss

    Recording.micro_losses = None
    return Recording


def allocation(model) -> dict:
    from hyperadalora.callbacks import _allocating_model, _unwrap

    target = _allocating_model(model)
    if hasattr(target, "allocator"):  # HyperAdaLoRA: its masks
        return {"mask": target.allocator.mask.detach().clone(), "total_rank": target.total_rank}
    # the keys without the adapter's name: peft's save_pretrained (process 0's checkpoints) drops it from the config's
    # rank pattern in place, the other process keeps it (peft's masking reads both)
    pattern = _unwrap(model).peft_config["default"].rank_pattern or {}
    pattern = {k.replace(".default", ""): v for k, v in pattern.items()}
    return {"rank_pattern": json.dumps(pattern, default=str, sort_keys=True)}


def state_digest(model) -> str:
    from hyperadalora.checkpoint import model_state
    from hyperadalora.tuner_utils import tensors_digest, unwrap_model

    return tensors_digest(model_state(unwrap_model(model))[0])


def run_case(out: str, case: str, world: int, fsdp: bool, resume: bool) -> dict:
    from transformers import TrainerCallback, TrainingArguments

    import hyperadalora as ha

    kind, method = case.split("-", 1)
    rank = int(os.environ.get("RANK", "0"))
    accumulation = ACCUMULATION.get(case, 1)
    path = os.path.join(out, case)
    common = dict(output_dir=os.path.join(path, "resumed") if resume else path, max_steps=STEPS,
                  per_device_train_batch_size=GLOBAL_BATCH // (world * accumulation),
                  gradient_accumulation_steps=accumulation, learning_rate=5e-3, seed=0, report_to=[], use_cpu=True,
                  save_strategy="steps", save_steps=min(SAVE_STEPS, RESUME_AT.get(case, SAVE_STEPS)), logging_steps=1,
                  disable_tqdm=True, dataloader_num_workers=0)
    if fsdp:
        common.update(fsdp=True,
                      fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    steps = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            steps[state.global_step] = allocation(model)

    tok = tokenizer() if kind == "sft" else None
    model = wrapped_model(case, tok)
    if kind == "sft":
        from datasets import Dataset
        from trl import SFTConfig

        args = SFTConfig(**common, max_length=24, eos_token="[SEP]", gradient_checkpointing=False, bf16=False)
        trainer = recording(ha.HyperAdaLoraSFTTrainer)(model=model, args=args, processing_class=tok,
                                                        train_dataset=Dataset.from_dict({"text": texts()}),
                                                        callbacks=[Spy()])
    else:
        trainer = recording(ha.HyperAdaLoraTrainer)(model=model, args=TrainingArguments(**common),
                                                     train_dataset=TokenDataset(), callbacks=[Spy()],
                                                     eval_dataset=TokenDataset(8, seed=1))
    trainer.micro_losses = {}
    evaluated = {}
    if kind == "trainer" and not resume:  # before training too (under FSDP: a model not yet prepared by accelerate)
        evaluated["before"] = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=os.path.join(path, f"checkpoint-{RESUME_AT[case]}") if resume else None)
    if kind == "trainer" and not resume:
        evaluated["after"] = trainer.evaluate()["eval_loss"]
    trainer.save_model(os.path.join(path, "resumed-final" if resume else "final"))
    losses = {step: sum(ls) for step, ls in trainer.micro_losses.items()}  # this process's loss of each step
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, losses)
        losses = {step: sum(g[step] for g in gathered) / world for step in losses}  # the global batch's loss
    record = {"losses": losses, "eval": evaluated, "steps": steps, "share": trainer.fsdp_info,
              "fsdp": trainer.is_fsdp_enabled,
              "dtensors": sum(hasattr(p, "to_local") for p in trainer.model.parameters()),
              "digest": state_digest(trainer.model), "world": world}
    torch.save(record, os.path.join(path, f"process-{rank}{'-resumed' if resume else ''}.pt"))
    return record


def run(out: str, cases: list, fsdp: bool = False, resume: bool = False) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {case: run_case(out, case, world, fsdp, resume) for case in cases}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--fsdp", action="store_true", help="FSDP through TrainingArguments (else: accelerate's env)")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    if os.environ.get("FSDP_WORKER_HANG_DUMP"):  # debugging a hung collective: every thread's stack after N s
        import faulthandler
        faulthandler.dump_traceback_later(int(os.environ["FSDP_WORKER_HANG_DUMP"]), exit=True)
    torch.set_num_threads(1)
    enable_fsdp_on_the_cpu()
    run(a.out, a.cases.split(","), a.fsdp, a.resume)


if __name__ == "__main__":
    main()
