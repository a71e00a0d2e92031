"""Check a GGUF LoRA export in llama.cpp: the change the adapter makes to llama.cpp's logits against the change it
makes to the transformers model's, on one prompt (pip install 'hyperadalora[serve]' for llama-cpp-python).

    python examples/gguf_check.py --adapter runs/nlg/adapter --base smollm2

Check on an F32 copy of the base (the default): on a quantized base (SmolLM2's shipped Q4_1), llama.cpp's own base
logits differ from the transformers model's by a few percent, more than a small adapter changes them, so such a check
cannot tell a right export from a wrong one. Prints the numbers; exits 1 when the change does not agree (correlation
below --min-corr).
"""
import argparse
import os
import sys
import tempfile

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--adapter", required=True, help="a saved adapter (save_pretrained) on a llama-family base")
parser.add_argument("--base", default="smollm2", help="the base: smollm2 or a .gguf file (whose transformers form "
                                                      "is made by converting it)")
parser.add_argument("--quantized", action="store_true", help="check on the .gguf as it is (not an F32 copy)")
parser.add_argument("--prompt", default="### Instruction: Name three primary colours. ### Response:")
parser.add_argument("--min-corr", type=float, default=0.999)
cli = parser.parse_args()

# --8<-- [start:example]
import numpy as np
import torch
from llama_cpp import Llama

import hyperadalora as ha
from hyperadalora import export as ex
from hyperadalora.base_models import load_model_and_tokenizer, smollm2_gguf_path


def llama_cpp_logits(base: str, ids, lora=None):
    llm = Llama(model_path=base, lora_path=lora, n_ctx=256, logits_all=True, verbose=False, seed=0)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    return out


tmp = tempfile.mkdtemp()
gguf_base = smollm2_gguf_path() if cli.base == "smollm2" else cli.base
adapter_gguf = ex.export(ex.read_adapter(cli.adapter), os.path.join(tmp, "adapter.gguf"), "gguf", base=cli.base)
checked_base = (gguf_base if cli.quantized
                else ex.dequantized_gguf(gguf_base, os.path.join(tmp, "base-f32.gguf")))

model, tokenizer, _ = load_model_and_tokenizer(cli.base, "instruction")
ids = tokenizer(cli.prompt)["input_ids"]
with torch.no_grad():
    base_hf = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    adapted = ha.load_adapter(load_model_and_tokenizer(cli.base, "instruction")[0], cli.adapter).eval()
    change_hf = adapted(input_ids=torch.tensor([ids])).logits[0].double().numpy() - base_hf
base_cpp = llama_cpp_logits(checked_base, ids)
change_cpp = llama_cpp_logits(checked_base, ids, adapter_gguf) - base_cpp

base_dev = np.linalg.norm(base_cpp - base_hf) / np.linalg.norm(base_hf)
size = np.linalg.norm(change_hf) / np.linalg.norm(base_hf)
rel = np.linalg.norm(change_cpp - change_hf) / np.linalg.norm(change_hf)
corr = np.corrcoef(change_hf.ravel(), change_cpp.ravel())[0, 1]
print(f"base logits, llama.cpp vs transformers: {base_dev:.2e} relative; the adapter changes them by {size:.3f}")
print(f"the adapter's change in llama.cpp vs transformers: relative error {rel:.3f}, correlation {corr:.5f}")
if size < 3 * base_dev:
    print("the adapter's change is within the engines' own base deviation: this check cannot see it")
sys.exit(0 if corr >= cli.min_corr else 1)
# --8<-- [end:example]
