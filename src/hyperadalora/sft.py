"""TRL integration: `HyperAdaLoraSFTTrainer`, TRL's ``SFTTrainer`` with what `HyperAdaLoraTrainer` adds.

``HyperAdaLoraSFTTrainer(model=ha.get_peft_model(causal_lm, config), args=trl.SFTConfig(...), train_dataset=...,
processing_class=tokenizer)`` is ``trl.SFTTrainer`` (its datasets, packing, chat templates, completion-only loss,
metrics) with `HyperAdaLoraTrainer`'s optimizer (built from ``model.optimizer_param_groups``: the hypernetworks'
own learning rates), rank allocation (`RankAllocationCallback`), the hypernetworks' lr schedule and the adapter's
checkpoints (`hyperadalora.load_adapter` reads ``save_model``'s directory). Two things TRL does would otherwise
bypass HyperAdaLoRA, and are set right here:

- ``SFTTrainer`` computes the loss with a fused LM head that it patches onto the model it is given and that runs the
  model's *backbone* directly: on a HyperAdaLoRA wrapper that would skip the wrapper's forward (no tensors generated
  by the hypernetworks). The fused head is moved onto the transformers model inside the wrapper, so the wrapper's
  forward runs (it generates this step's adapter) and passes ``fused_lm_head=True`` on.
- The fused loss is computed from the per-token log-probabilities, not from the model's ``loss``, so HyperAdaLoRA's
  orthogonal regulariser (``orth_reg_weight``), which its forward adds to ``loss``, would be dropped: it is added to
  the loss here (divided by the gradient-accumulation steps, as TRL does with its own auxiliary loss).

Under FSDP2 (``accelerate launch`` with an FSDP2 config, or ``fsdp`` / ``fsdp_config`` in ``SFTConfig``) it shards only
the frozen base model and keeps the adapter and the hypernetworks whole on every process, as `HyperAdaLoraTrainer`
does (the fused head runs inside the root FSDP unit, whose parameters are gathered during its forward).

trl is an optional dependency (``pip install 'hyperadalora[trl]'``); importing this module without it raises an
ImportError that says so. A plain ``trl.SFTTrainer`` with ``callbacks=[ha.RankAllocationCallback()]`` and ``optimizers=(AdamW(
model.optimizer_param_groups(lr)), None)`` is *not* enough for HyperAdaLoRA, for the two reasons above.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head
except ImportError as e:  # pragma: no cover - exercised only without trl
    from .extras import missing

    raise missing("trl", "hyperadalora's TRL integration (HyperAdaLoraSFTTrainer; tested with trl==1.16.0)") from e

from .callbacks import HyperAdaLoraTrainer
from .methods import AdapterModel
from .tuner_utils import unwrap_model

# the per-token fields SFTTrainer's compute_loss reads (its loss, entropy and mean_token_accuracy metrics)
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class HyperAdaLoraSFTTrainer(HyperAdaLoraTrainer, SFTTrainer):
    """``trl.SFTTrainer`` for HyperAdaLoRA models (and this package's other adapter models, and peft's AdaLoRA):
    `HyperAdaLoraTrainer`'s optimizer groups, callbacks and saving on top of SFTTrainer (see the module's doc).
    Takes SFTTrainer's arguments; pass the wrapped model (``ha.get_peft_model(...)``), not ``peft_config``."""

    def __init__(self, model, *args, **kwargs):
        if isinstance(model, str) or kwargs.get("peft_config") is not None:
            raise ValueError("HyperAdaLoraSFTTrainer takes a model already wrapped with hyperadalora.get_peft_model("
                             "model, config) (load the causal LM first), and no peft_config.")
        super().__init__(model, *args, **kwargs)
        wrapper = unwrap_model(self.model)
        if isinstance(wrapper, AdapterModel) and "forward" in wrapper.__dict__:
            # SFTTrainer patched the wrapper's forward with its fused LM head: move it to the inner model
            del wrapper.__dict__["forward"]
            add_fused_lm_head(wrapper.base_model, outputs=FUSED_OUTPUTS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        wrapper = unwrap_model(model)
        if not (isinstance(wrapper, AdapterModel) and wrapper.training and wrapper._pending is not None
                and not wrapper._pending_committed):
            return result
        # the regulariser of the tensors this forward generated (graph into the hypernetworks; HyperAdaLoRA's
        # orthogonal penalty), as the wrapper's own forward adds it to ``loss``
        penalty, weight = wrapper.penalty(wrapper._pending), wrapper.penalty_weight
        if penalty is None:
            return result
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        if return_outputs:
            loss, outputs = result
            return loss + weight * penalty.to(loss.dtype) / steps, outputs
        return result + weight * penalty.to(result.dtype) / steps
