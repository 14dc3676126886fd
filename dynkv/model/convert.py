"""GGUF → a plain bf16 Hugging Face model directory, with transformers (needs torch, `gguf`).

Run as `python -m dynkv.model.convert FILE.gguf OUT_DIR` by the fetcher: torch and transformers
then load in a child process (about 1 GB that the launcher would otherwise keep for its whole
life), and a crash in them is an error message rather than a dead launcher.

transformers keeps GGUF weights packed by default in its newer releases (and then refuses to
save them); `GgufConfig(dequantize=True)` asks for dense tensors, which save as safetensors.
Older releases always dequantize and have no `GgufConfig`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def convert(gguf: Path, out: Path, max_len: int | None = None) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: nothing to look up
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict = {"gguf_file": gguf.name}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.bfloat16, **kwargs)
    model = model.to(torch.bfloat16)
    # The dense model is no longer a GGUF one: no quantizer, no quantization config to save.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.save_pretrained(out)
    if max_len:
        tokenizer.model_max_length = max_len
    tokenizer.save_pretrained(out)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m dynkv.model.convert FILE.gguf OUT_DIR [MAX_LEN]", file=sys.stderr)
        return 2
    convert(Path(argv[0]), Path(argv[1]), int(argv[2]) if len(argv) == 3 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
