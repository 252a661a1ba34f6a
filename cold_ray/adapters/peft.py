"""Read and validate a PEFT LoRA adapter folder against a base model (docs/design.md §4).

Validation happens before anything touches a slot, and every failure is an `AdapterError`
whose message names the problem and the expected value. Adapter files may come from a client
of the admin API, so they are read as hostile: only regular files are opened (a FIFO would
block the read forever, a device never ends), sizes are checked before a byte is read, and
messages name a file by its name in the adapter folder, never by a path on the server.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch
from safetensors import SafetensorError

from cold_ray.model.args import TARGET_MODULES, ModelArgs

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
DEFAULT_MAX_BYTES = 1 << 30
CONFIG_MAX_BYTES = 1 << 20
_KEY = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_UNSUPPORTED_OPTIONS = {
    "trainable_token_indices": "it trains embedding rows (the vocabulary)",
    "layer_replication": "it changes the base model's layer stack",
    "lora_bias": "LoRA bias terms are not served",
    "target_parameters": "only linear modules are served",
}
_VOCAB_MODULES = ("embed_tokens", "lm_head", "wte", "word_embeddings")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why."""


class NotARegularFile(OSError):
    """A path that is a FIFO, device, socket or folder where a file belongs."""


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (symlinks followed); else raise
    NotARegularFile. Opened non-blocking, so a FIFO cannot stall the open itself (a regular
    file reads the same either way); other failures are the OSError of the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
            raise NotARegularFile(0, f"not a regular file ({kind})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def os_reason(e: OSError) -> str:
    """What went wrong, without the path an OSError's str() carries."""
    return (e.strerror or type(e).__name__).lower()


def read_file(path: Path, limit: int) -> bytes:
    """The bytes of the adapter file `path`, at most `limit` of them: refused by its size
    before it is read. AdapterError names the file by its name alone and says why."""
    name = path.name
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise AdapterError(f"{name} is {size} bytes, over the limit of {limit}")
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise AdapterError(f"the adapter has no {name}") from None
    except NotARegularFile as e:
        raise AdapterError(f"{name} is {e.strerror}") from None
    except OSError as e:
        raise AdapterError(f"cannot read {name}: {os_reason(e)}") from None
    if len(data) > limit:  # grew while it was read
        raise AdapterError(f"{name} is over the limit of {limit} bytes")
    return data


@dataclass
class PeftAdapter:
    path: Path
    rank: int  # the largest rank over its modules
    scale: float  # lora_alpha / r (or / sqrt(r) with rslora)
    target_modules: tuple[str, ...]
    base_model: str | None
    nbytes: int
    sha256: str  # of adapter_model.safetensors
    config_sha256: str  # of adapter_config.json (scaling, targets: part of the adapter too)
    warnings: tuple[str, ...]  # served anyway, but worth telling the operator (recorded)
    # (layer, module) -> (A [r, in], B [out, r] with any module-specific scale folded in),
    # in the dtype they were stored in (the slots cast them to the model's dtype)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    # The checksum this copy was verified against (the registry's); slots compare it.
    version: str = ""

    @property
    def checksum(self) -> str:
        return adapter_checksum(self.sha256, self.config_sha256)


def adapter_checksum(weights_sha256: str, config_sha256: str) -> str:
    """One checksum over both files: a changed config (scaling, targets) is a changed adapter,
    like changed weights. A catalog entry whose config was never hashed (`config_sha256` "",
    written before configs were checksummed) is identified by its weights alone."""
    if not config_sha256:
        return weights_sha256
    return hashlib.sha256(f"{weights_sha256}:{config_sha256}".encode()).hexdigest()


def files_checksum(path: str | Path) -> str:
    """`adapter_checksum` of the adapter folder at `path` as it is on disk now; OSError
    (NotARegularFile included) when a file cannot be read."""
    return adapter_checksum(weights_sha256(path), config_sha256(path))


def config_sha256(path: str | Path) -> str:
    """sha256 of adapter_config.json (a file over the size limit hashes its first bytes: it
    cannot match a valid config's checksum)."""
    with open_regular(Path(path) / CONFIG_FILE) as f:
        return hashlib.sha256(f.read(CONFIG_MAX_BYTES + 1)).hexdigest()


def weights_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open_regular(Path(path) / WEIGHTS_FILE) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_finite(weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse NaN/inf weights. Finite sums prove all values finite (NaN and inf propagate) at
    a fraction of the cost of `isfinite(t).all()` per tensor; only when some sum is not finite
    (a bad value, or an overflowing sum) are the tensors checked one by one."""
    tensors = [t for ab in weights.values() for t in ab]
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return
    for (layer, module), (a, b) in weights.items():
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise AdapterError(f"layer {layer} {module}: weights contain NaN or inf")


# Config keys whose JSON type is checked before they are used (type(None): it may be null): a
# value of another type is an AdapterError naming the key, not a crash deeper in.
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str,),
    "base_model_name_or_path": (str, type(None)),
    "lora_alpha": (int, float),
    "alpha_pattern": (dict, type(None)),
    "use_rslora": (bool,),
    "use_dora": (bool, type(None)),
    "bias": (str,),
    "modules_to_save": (list, type(None)),
}


def _folder(path: Path) -> None:
    """Refuse a missing adapter folder, or one that cannot be looked at."""
    try:
        is_dir = path.is_dir()
    except OSError as e:
        raise AdapterError(f"cannot read the adapter folder: {os_reason(e)}") from None
    if not is_dir:
        raise AdapterError("the adapter folder is missing or is not a directory")


_JSON_NAMES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "a list",
    type(None): "null",
}


def _json_type_ok(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a JSON true is no number, though Python's bool is an int
        return bool in types
    return isinstance(value, types)


def _check_config_types(cfg: dict) -> None:
    for key, types in _CONFIG_TYPES.items():
        if key in cfg and not _json_type_ok(cfg[key], types):
            expected = " or ".join(dict.fromkeys(_JSON_NAMES[t] for t in types))
            raise AdapterError(f"{CONFIG_FILE}: {key} must be {expected}, got {cfg[key]!r:.80}")
    for module, alpha in (cfg.get("alpha_pattern") or {}).items():
        if not _json_type_ok(alpha, (int, float)):
            raise AdapterError(
                f"{CONFIG_FILE}: alpha_pattern[{module!r:.40}] must be a number, got {alpha!r:.80}"
            )


def _read_config(path: Path) -> tuple[dict, str]:
    """The adapter's config, checked, and the sha256 of its bytes."""
    _folder(path)
    if not os.path.exists(path / CONFIG_FILE):  # never raises: an unreadable one reports below
        raise AdapterError(f"the adapter has no {CONFIG_FILE} (not a PEFT adapter)")
    raw = read_file(path / CONFIG_FILE, CONFIG_MAX_BYTES)
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object, got {type(cfg).__name__}")
    _check_config_types(cfg)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not supported; expected 'LORA'")
    for flag in ("use_dora",):
        if cfg.get(flag):
            raise AdapterError(f"{flag}=true adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"LoRA bias={cfg.get('bias')!r} is not supported; expected 'none'")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {cfg['modules_to_save']} is not supported")
    # Options that change the model beyond per-layer LoRA deltas: refused, not half-applied.
    for key, why in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise AdapterError(f"{key}={cfg[key]!r} is not supported: {why}")
    return cfg, hashlib.sha256(raw).hexdigest()


def _module_scale(cfg: dict, module: str, rank: int) -> float:
    alpha = (cfg.get("alpha_pattern") or {}).get(module, cfg.get("lora_alpha", rank))
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a finite number, got {alpha!r}")
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def base_warning(declared: str | None, args: ModelArgs) -> str | None:
    """A note when the adapter names another base model than the one served. Names are not
    the guard — the same weights go by a hub id, a folder name or a GGUF stem; shapes,
    layers and vocabulary are checked tensor by tensor below."""
    if not declared:
        return None
    norm = lambda s: Path(str(s)).name.lower().removesuffix("-gguf")
    if norm(declared) == norm(args.name):
        return None
    return (
        f"adapter declares base model {declared!r}, this server runs {args.name!r}; its "
        "shapes fit, so it is served — check that it was trained on these weights"
    )


def load_peft_adapter(
    path: str | Path,
    args: ModelArgs,
    max_rank: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_sha256: str | None = None,
) -> PeftAdapter:
    """Read a PEFT adapter and check it fits `args`; raise AdapterError naming any problem.

    `expected_sha256`: the checksum the registry recorded — `adapter_checksum` of weights and
    config, or (for a catalog entry written before configs were checksummed) the weights' own
    sha256; a differing file is reported rather than served."""
    path = Path(path)
    cfg, config_sha = _read_config(path)
    weights_file = path / WEIGHTS_FILE
    if not os.path.exists(weights_file):  # never raises: an unreadable one reports below
        pickles = [p for p in PICKLE_FILES if os.path.exists(path / p)]
        if pickles:
            raise AdapterError(
                f"the adapter ships pickled weights ({pickles[0]}); refusing to load them "
                f"because unpickling runs arbitrary code — convert to {WEIGHTS_FILE}"
            )
        raise AdapterError(f"the adapter has no {WEIGHTS_FILE}")
    base = cfg.get("base_model_name_or_path")
    warning = base_warning(base, args)
    data = read_file(weights_file, max_bytes)  # the checksum and the tensors: one read
    nbytes = len(data)
    sha = hashlib.sha256(data).hexdigest()
    checksum = adapter_checksum(sha, config_sha)
    if expected_sha256 is not None and expected_sha256 not in (checksum, sha):
        raise AdapterError(
            f"adapter files changed since registration: sha256 {checksum[:12]}… of "
            f"{WEIGHTS_FILE} and {CONFIG_FILE} != registered {expected_sha256[:12]}…"
        )

    shapes = args.module_shapes()
    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError) as e:  # ValueError: header says more than is there
        raise AdapterError(f"{WEIGHTS_FILE} is corrupt or truncated: {e}") from e
    del data
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None and any(f".{v}." in f".{key}" for v in _VOCAB_MODULES):
            raise AdapterError(
                f"tensor {key!r} adapts the embeddings or LM head (the vocabulary); only "
                "per-layer LoRA weights are served"
            )
        if m is None:
            raise AdapterError(f"unsupported tensor {key!r} (only layer LoRA A/B weights)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGET_MODULES:
            raise AdapterError(
                f"target module {module!r} is not supported; supported: {TARGET_MODULES}"
            )
        if layer >= args.num_layers:
            raise AdapterError(
                f"tensor {key!r} names layer {layer}, but the model has {args.num_layers}"
            )
        raw.setdefault((layer, module), {})[ab] = tensor
    if not raw:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    max_r, scale = 0, None
    for (layer, module), ab in sorted(raw.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        if a.dtype not in _FLOAT_DTYPES or b.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"layer {layer} {module}: dtype {a.dtype}/{b.dtype} is not a float")
        fan_in, fan_out = shapes[module]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                f"fit the base layer; expected ({r}, {fan_in}) / ({fan_out}, {r})"
            )
        if r > max_rank:
            raise AdapterError(f"adapter rank {r} exceeds max_lora_rank {max_rank}")
        if r < 1:
            raise AdapterError(f"layer {layer} {module}: rank must be >= 1")
        s = _module_scale(cfg, module, r)  # PEFT scales each module by its own rank
        scale = s if scale is None else scale
        if s != scale:
            b = b.float() * (s / scale)
        weights[(layer, module)] = (a, b)
        max_r = max(max_r, r)
    _check_finite(weights)
    return PeftAdapter(
        path=path,
        rank=max_r,
        scale=float(scale),
        target_modules=tuple(sorted({m for _, m in weights})),
        base_model=base,
        nbytes=nbytes,
        sha256=sha,
        config_sha256=config_sha,
        warnings=(warning,) if warning else (),
        weights=weights,
        version=expected_sha256 or checksum,
    )
