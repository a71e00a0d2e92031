"""Dev-set evaluation of a run: the task loss (no regulariser, the same quantity for every method), the task's
metrics, per-example results, and generation scores for instruction tasks."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import data as data_lib


@torch.no_grad()
def evaluate(wrapped, spec, loader, device, tokenizer=None, gen_examples=None, max_new_tokens=64,
             autocast: Callable = None, task_loss: Optional[Callable] = None, details: bool = False,
             progress: bool = False) -> dict:
    """Dev metrics; ``eval_loss`` is the mean task loss (``task_loss(output)``, default ``output.loss``): the same
    quantity for every method, no regulariser in it. ``details``: also the per-example results, in dev-set order
    (classification: ``correct``, a string of 0/1; instruction tasks: ``example_losses``, each example's mean
    token loss), for scores on parts of the dev set (`experiments.lr_sweep`). ``progress``: progress bars of the
    dev batches and of the generated tokens."""
    wrapped.eval()
    autocast = autocast or contextlib.nullcontext
    losses, preds, labels, example_losses = [], [], [], []
    for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = wrapped(**batch)
        loss = task_loss(out) if task_loss is not None else getattr(out, "loss", None)
        losses.append(float(loss) if loss is not None else float("nan"))
        if spec.kind == "classification":
            preds.extend(out.logits.argmax(-1).tolist())
            labels.extend(batch["labels"].tolist())
        elif details:
            example_losses.extend(per_example_lm_loss(out.logits, batch["labels"]))
    result = {"eval_loss": float(np.mean(losses)) if losses else float("nan")}
    if spec.kind == "classification":
        result.update(data_lib.classification_metrics(spec.name, preds, labels))
        if details:
            result["correct"] = "".join("1" if p == y else "0" for p, y in zip(preds, labels))
    elif details:
        result["example_losses"] = [round(v, 6) for v in example_losses]
    elif gen_examples:
        result.update(generate_and_score(wrapped, tokenizer, gen_examples, device, max_new_tokens, progress))
    wrapped.train()
    return result


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each sequence's mean next-token loss over its labelled tokens (labels -100 are ignored; the shift of a causal
    LM's own loss); nan for a sequence without labelled tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    mask = (labels != -100).float()
    counts = mask.sum(1)
    return [float(v) if c > 0 else float("nan") for v, c in zip((token * mask).sum(1) / counts.clamp(min=1), counts)]


@torch.no_grad()
def generate_and_score(wrapped, tokenizer, examples, device, max_new_tokens=64, progress: bool = False) -> dict:
    """BLEU-4 / ROUGE-1 of greedy answers to ``examples`` (8 at a time); ``progress``: a bar of the tokens generated."""
    predictions = []
    tokenizer.padding_side = "left"
    chunks = range(0, len(examples), 8)
    bar = tqdm(total=len(chunks) * max_new_tokens, desc=f"generating {len(examples)} answers", unit="token",
               disable=not progress, leave=False)
    extra = {}
    if progress:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Tick(StoppingCriteria):  # counts the generation steps; never stops generation
            def __call__(self, input_ids, scores, **kwargs):
                bar.update(1)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        extra["stopping_criteria"] = StoppingCriteriaList([Tick()])
    for i in chunks:
        chunk = examples[i:i + 8]
        enc = tokenizer([data_lib.format_prompt(e) for e in chunk], return_tensors="pt", padding=True).to(device)
        enc.pop("token_type_ids", None)  # causal LMs take none
        out = wrapped.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, **extra)
        predictions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        bar.n = (i // 8 + 1) * max_new_tokens  # a chunk that ended early: its remaining tokens count as done
        bar.refresh()
    bar.close()
    tokenizer.padding_side = "right"
    scores = data_lib.generation_metrics([p.strip() for p in predictions], [e["output"] for e in examples])
    return {**scores, "n_generated": len(predictions)}
