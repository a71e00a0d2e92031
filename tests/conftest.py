import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is as fast and does not thrash beside other work

# The device of the device-agnostic tests (marked ``device``; they take the ``device`` fixture):
# HYPERADALORA_TEST_DEVICE=cuda python -m pytest -m device  (benchmarks/gpu_check.sh). Default: cpu.
DEVICE_ENV = "HYPERADALORA_TEST_DEVICE"


def pytest_configure(config):
    name = os.environ.get(DEVICE_ENV, "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise pytest.UsageError(f"{DEVICE_ENV}={name!r} is not a device name: use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{DEVICE_ENV}={name!r}, but CUDA is not available here (torch {torch.__version__}): "
                                f"unset it to run the tests on the CPU.")


@pytest.fixture(scope="session")
def device():
    return torch.device(os.environ.get(DEVICE_ENV, "cpu"))


def on(device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def make_bert(num_layers=2, hidden=32, vocab=100, num_labels=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def make_llama(num_layers=2, hidden=32, vocab=100, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def bert():
    return make_bert()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (8, 12), generator=g), "labels": torch.tensor([0, 1] * 4)}


BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def quantize_linears(model, bits=4, quant_type="nf4", skip=("classifier", "pooler", "lm_head"), device="cpu"):
    """Replace the model's nn.Linear layers (but those under ``skip``) by bitsandbytes 4-bit / 8-bit layers holding
    the same weights, quantized (what from_pretrained with a BitsAndBytesConfig builds)."""
    import bitsandbytes as bnb
    from torch import nn

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not any(s in n.split(".") for s in skip)]
    for name in names:
        lin = model.get_submodule(name)
        has_bias = lin.bias is not None
        if bits == 4:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=lin.weight.dtype,
                                  quant_type=quant_type)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type)
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=0.0)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q.to(device))
    return model


def train_steps(model, batch, steps, lr=1e-2, start=1, opt=None, loss="loss", eval_after=False):
    """``steps`` optimizer steps of an adapter model of this package as the training loop takes them
    (``update_and_allocate`` after each); returns each step's ``loss`` (with any regulariser) or ``task_loss``."""
    opt = opt or torch.optim.AdamW(model.optimizer_param_groups(lr))
    model.train()
    losses = []
    for step in range(start, start + steps):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append((model.last_task_loss if loss == "task_loss" else out.loss).item())
    if eval_after:
        model.eval()
    return losses


WORDS_POS = ["good", "great", "fine", "happy", "nice"]
WORDS_NEG = ["bad", "awful", "poor", "sad", "ugly"]


def toy_examples(n, seed=0):
    """``n`` tiny labelled sentences (positive / negative words, alternating labels) for training-loop tests."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = WORDS_POS if label else WORDS_NEG
        picks = torch.randint(0, len(words), (4,), generator=g).tolist()
        out.append({"text_a": " ".join(words[p] for p in picks) + " movie", "text_b": None, "label": label})
    return out
