"""The local test model: shapes, determinism, tokenizer, loading, and the atomic cache."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jinja2.sandbox
import numpy as np
import pytest

from dynkv.model import PRESETS, ModelError, create_model, ensure_model, kv_bytes_per_token
from dynkv.model import generate as gen
from dynkv.model import tokenizer as tok
from dynkv.model.weights import to_bf16_bits

REPO = Path(__file__).resolve().parents[2]
MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
    "dynkv-model.json",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return create_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", 0).path


# --- shapes -------------------------------------------------------------------------------------


def test_bench_is_the_design_model():
    """docs/benchmarks.md: the reference TTFTs were measured on exactly this shape."""
    s = PRESETS["bench"]
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads) == (768, 12, 12)
    assert (s.num_key_value_heads, s.head_dim, s.intermediate_size) == (3, 64, 2048)
    assert (s.vocab_size, s.dtype, s.max_position_embeddings) == (2048, "bfloat16", 8192)
    assert s.params == 75_909_888 and round(s.params / 1e6) == 76
    assert kv_bytes_per_token(s) == 9_216


def test_tiny_shape():
    s = PRESETS["tiny"]
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads) == (256, 4, 4)
    assert (s.num_key_value_heads, s.head_dim, s.intermediate_size, s.vocab_size) == (
        2,
        64,
        512,
        2048,
    )
    assert s.max_position_embeddings == 4096
    assert s.kv_bytes_per_token == 2 * 4 * 2 * 64 * 2 == 2_048
    assert s.params < PRESETS["bench"].params / 20


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_are_valid_llama_shapes(preset):
    s = PRESETS[preset]
    assert s.hidden_size % s.num_attention_heads == 0
    assert s.num_attention_heads % s.num_key_value_heads == 0
    assert s.head_dim == 64  # what vLLM's CPU attention is built for
    assert s.max_position_embeddings >= 4096


def test_kv_bytes_per_token_reads_hf_configs(tiny, tmp_path):
    assert kv_bytes_per_token(tiny) == 2_048  # a model directory
    assert kv_bytes_per_token(tiny / "config.json") == 2_048
    # A config without head_dim / num_key_value_heads (MHA), in float32.
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "dtype": "float32"}
    assert kv_bytes_per_token(cfg) == 2 * 2 * 8 * 64 * 4
    assert kv_bytes_per_token({"text_config": cfg}) == 2 * 2 * 8 * 64 * 4
    with pytest.raises(ValueError, match="unknown dtype"):
        kv_bytes_per_token(cfg | {"dtype": "int3"})


# --- files and weights --------------------------------------------------------------------------


def test_model_directory_is_complete_and_consistent(tiny):
    assert {p.name for p in tiny.iterdir()} == MODEL_FILES
    config = json.loads((tiny / "config.json").read_text())
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "bfloat16" and config["head_dim"] == 64
    vocab = json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]
    ids = {t: vocab.get(t) for t in tok.SPECIAL_TOKENS}
    assert config["bos_token_id"] == generation["bos_token_id"] == ids[tok.BOS]
    assert config["eos_token_id"] == generation["eos_token_id"] == [ids[tok.EOS], ids[tok.EOT]]
    tcfg = json.loads((tiny / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"]) == (tok.BOS, tok.EOT)
    assert "random" in (tiny / "README.md").read_text()


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_safetensors_layout_and_values(tiny):
    header, data = read_safetensors(tiny / "model.safetensors")
    shapes = PRESETS["tiny"].tensor_shapes()
    assert header.pop("__metadata__")["format"] == "pt"
    assert {k: tuple(v["shape"]) for k, v in header.items()} == shapes
    assert all(v["dtype"] == "BF16" for v in header.values())
    assert len(data) == 2 * PRESETS["tiny"].params
    assert "lm_head.weight" not in header  # tied, as the bench model's 76M counts

    def tensor(name: str) -> np.ndarray:
        start, end = header[name]["data_offsets"]
        bits = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)

    assert np.all(tensor("model.norm.weight") == 1.0)
    q = tensor("model.layers.0.self_attn.q_proj.weight")
    assert np.isfinite(q).all() and abs(q.mean()) < 1e-3 and 0.019 < q.std() < 0.021


def test_bf16_rounding_is_round_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, 0.0], dtype=np.float32)
    # 1 + 2^-8 is a tie between 1.0 and 1 + 2^-7: even mantissa wins (1.0); 1 + 3·2^-8 rounds up.
    assert to_bf16_bits(values).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x0000]


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = create_model(tmp_path / "again", "tiny", 0).path
    other = create_model(tmp_path / "other", "tiny", 1).path
    a, b, c = hashes(tiny), hashes(again), hashes(other)
    a.pop("README.md"), b.pop("README.md"), c.pop("README.md")  # they name the directory
    a.pop("dynkv-model.json"), b.pop("dynkv-model.json"), c.pop("dynkv-model.json")
    assert a == b
    assert c["model.safetensors"] != a["model.safetensors"]
    assert c["tokenizer.json"] == a["tokenizer.json"]  # the tokenizer does not depend on the seed


def test_generation_does_not_depend_on_the_process(tiny, tmp_path):
    """Hash randomisation and thread counts must not leak into the files."""
    code = (
        "import sys; from pathlib import Path; from dynkv.model import create_model; "
        "create_model(Path(sys.argv[1]), 'tiny', 0)"
    )
    env = os.environ | {
        "PYTHONHASHSEED": "12345",
        "RAYON_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], env=env, check=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256(tmp_path / "p" / name) == sha256(tiny / name), name


# If a dependency upgrade changes these (numpy's normal sampler, the BPE trainer), every machine
# would no longer build the same model: bump GENERATOR_VERSION so caches rebuild, then update.
GOLDEN_TINY_SHA256 = {
    "model.safetensors": "7a6b3ddc3ee2f48025b8ca1848097dc644db0dba8eaeeb7de08b6637e1030969",
    "tokenizer.json": "2d24bd8e052ddb0c240e60bb84292a93fcba967701cdab46c2528ec77de93a3c",
}


def test_golden_hashes(tiny):
    got = {name: sha256(tiny / name) for name in GOLDEN_TINY_SHA256}
    assert got == GOLDEN_TINY_SHA256


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny / "tokenizer.json"))


def test_tokenizer_has_the_preset_vocab_and_specials(tokenizer):
    assert tokenizer.get_vocab_size() == 2048
    assert [tokenizer.token_to_id(t) for t in tok.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "text",
    [
        "The cache block is a prefix of the prompt.",
        "  leading spaces,\ttabs\nand new lines\n\n",
        "Ünïcødé, 日本語 and emoji 🙂 — all bytes round-trip.",
        "",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    encoded = tokenizer.encode(text)
    assert encoded.ids[0] == tokenizer.token_to_id(tok.BOS)  # completions start with BOS
    assert tokenizer.decode(encoded.ids, skip_special_tokens=True) == text


def test_tokenizer_compresses_english(tokenizer):
    text = "The people of the world study the water and the earth every day."
    assert len(tokenizer.encode(text, add_special_tokens=False).ids) <= 18  # 14 words


def test_special_tokens_are_single_tokens(tokenizer):
    text = f"{tok.START_HEADER}user{tok.END_HEADER}\n\nhi{tok.EOT}"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == 2 and 3 in ids and ids[-1] == 4


def render_chat(tiny: Path, messages: list[dict], add_generation_prompt: bool = True) -> str:
    tcfg = json.loads((tiny / "tokenizer_config.json").read_text())
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tcfg["chat_template"])
    return template.render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=tcfg["bos_token"]
    )


def test_chat_template_renders_llama3_style(tiny, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "Hello there"},
    ]
    text = render_chat(tiny, messages)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert not render_chat(tiny, messages, add_generation_prompt=False).endswith("\n\n")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids.count(0) == 1 and ids.count(2) == 3 and ids.count(4) == 2


def test_corpus_is_deterministic_and_large_enough():
    assert tok.corpus() == tok.corpus()
    assert tok.corpus(seed=1) != tok.corpus()
    assert sum(map(len, tok.corpus())) > 500_000


# --- ensure_model -------------------------------------------------------------------------------


def test_ensure_model_uses_xdg_cache_and_reuses(clean_env, tmp_path, monkeypatch):
    path = ensure_model("tiny")
    assert path == tmp_path / "cache" / "dynkv" / "models" / "tiny"
    assert {p.name for p in path.iterdir()} == MODEL_FILES
    before = hashes(path), path.stat().st_ino

    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a current model")

    monkeypatch.setattr(gen, "write_model", boom)
    assert ensure_model("tiny") == path
    assert (hashes(path), path.stat().st_ino) == before


def test_ensure_model_default_root_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gen.models_root() == tmp_path / ".cache" / "dynkv" / "models"


def test_ensure_model_failure_leaves_nothing(tmp_path, monkeypatch):
    real = gen.write_model

    def half(directory, *args, **kwargs):
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half way

    monkeypatch.setattr(gen, "write_model", half)
    with pytest.raises(KeyboardInterrupt):
        ensure_model("tiny", tmp_path)
    assert not (tmp_path / "tiny").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".tiny.lock"]
    monkeypatch.setattr(gen, "write_model", real)
    assert (ensure_model("tiny", tmp_path) / "model.safetensors").is_file()


def test_ensure_model_cleans_up_after_killed_runs(tmp_path):
    leftover = tmp_path / ".tiny.dynkv-tmp-dead"  # what SIGKILL during a build leaves
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    path = ensure_model("tiny", tmp_path)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]
    assert gen.read_marker(path)["generator_version"] == gen.GENERATOR_VERSION


def test_ensure_model_rebuilds_an_outdated_cache(tmp_path):
    path = ensure_model("tiny", tmp_path)
    marker = json.loads((path / gen.MARKER).read_text())
    (path / gen.MARKER).write_text(json.dumps(marker | {"generator_version": 0}))
    (path / "model.safetensors").write_bytes(b"old")
    assert ensure_model("tiny", tmp_path) == path
    assert gen.read_marker(path)["generator_version"] == gen.GENERATOR_VERSION
    assert (path / "model.safetensors").stat().st_size > 2 * PRESETS["tiny"].params
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]


def test_ensure_model_concurrent_callers_get_one_complete_model(tmp_path):
    code = "import sys; from pathlib import Path; from dynkv.model import ensure_model; print(ensure_model('tiny', Path(sys.argv[1])))"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert set(outs) == {str(tmp_path / "tiny")}
    assert {p.name for p in (tmp_path / "tiny").iterdir()} == MODEL_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]


def test_ensure_model_rebuilds_a_damaged_cache(tmp_path):
    path = ensure_model("tiny", tmp_path)
    (path / "model.safetensors").unlink()
    assert (ensure_model("tiny", tmp_path) / "model.safetensors").is_file()


def test_ensure_model_unknown_preset(tmp_path):
    with pytest.raises(ModelError, match="unknown model preset 'huge'"):
        ensure_model("huge", tmp_path)
    assert not any(tmp_path.iterdir())


# --- loading ------------------------------------------------------------------------------------


def test_transformers_loads_and_generates_deterministically(tiny):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.num_parameters() == PRESETS["tiny"].params
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == render_chat(tiny, [{"role": "user", "content": "Hello there"}])
    inputs = tokenizer("The cache block is a prefix of", return_tensors="pt")
    runs = [
        model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist() for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == inputs["input_ids"].shape[1] + 8
    logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


# --- create_model -------------------------------------------------------------------------------


def test_create_model_force_replaces_only_with_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.bin").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        create_model(out, "tiny")
    assert (out / "stale.bin").exists()
    create_model(out, "tiny", force=True)
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left beside it


def test_create_model_into_an_existing_empty_directory(tmp_path):
    (tmp_path / "m").mkdir()
    assert create_model(tmp_path / "m", "tiny").path == tmp_path / "m"
    assert {p.name for p in (tmp_path / "m").iterdir()} == MODEL_FILES
