"""Security defaults that need no Ray cluster: nothing is ever unpickled (in the source, and at
run time while a model and adapters load), pickled adapters are refused without running their
payload, and the default adapter roots keep registry calls away from server files.

The HTTP side (tokens, sizes, sources through POST /v1/adapters, logs) is in
tests/test_serve_api.py and tests/test_faults.py."""

import ast
import io
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cold_ray.adapters.peft import WEIGHTS_FILE, AdapterError, load_peft_adapter
from cold_ray.adapters.registry import Registry
from cold_ray.engine import EngineCore, SamplingParams
from cold_ray.model.loader import read_model_args
from cold_ray.serve.app import prepare
from cold_ray.serve.app_args import AppArgs

REPO = Path(__file__).resolve().parents[1]
# (module, attribute) calls that deserialize with pickle, i.e. may run arbitrary code
UNPICKLING_CALLS = {
    ("torch", "load"),
    ("torch.serialization", "load"),
    ("torch.jit", "load"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
}
UNPICKLING_MODULES = {"pickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _unpickling_sites(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNPICKLING_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLING_MODULES or any(
                (node.module, a.name) in UNPICKLING_CALLS for a in node.names
            ):
                found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            module, _, attr = name.rpartition(".")
            if (module, attr) in UNPICKLING_CALLS or (module in ("np", "numpy") and attr == "load"):
                found.append(f"{where} {name}(...)")
            for kw in node.keywords:  # np.load(..., allow_pickle=True), torch weights_only=False
                if kw.arg in ("allow_pickle", "weights_only") and isinstance(
                    kw.value, ast.Constant
                ):
                    if kw.value.value is (kw.arg == "allow_pickle"):
                        found.append(f"{where} {kw.arg}={kw.value.value}")
    return found


def test_the_source_never_unpickles():
    """No torch.load / pickle / marshal / joblib / numpy pickle loads in the package (Serve's
    own cloudpickling of deployments is Ray's, not ours)."""
    files = sorted((REPO / "cold_ray").rglob("*.py"))
    assert len(files) > 20
    sites = [s for f in files for s in _unpickling_sites(f.read_text(), str(f.relative_to(REPO)))]
    assert sites == [], sites


def test_the_scan_finds_what_it_looks_for():
    source = (
        "import pickle\nimport torch\nfrom torch import load\nimport numpy as np\n"
        "torch.load('x')\nnp.load('y', allow_pickle=True)\ntorch.serialization.load('z')\n"
        "torch.load('w', weights_only=False)\n# torch.load in a comment is fine\n"
    )
    found = [s.split(" ", 1)[1] for s in _unpickling_sites(source, "probe.py")]
    assert sorted(found) == sorted(
        [
            "import pickle",
            "from torch import ...",
            "torch.load(...)",
            "np.load(...)",
            "allow_pickle=True",
            "torch.serialization.load(...)",
            "torch.load(...)",
            "weights_only=False",
        ]
    )


class Unpickled(AssertionError):
    pass


_ARMED = []


def _audit(event: str, args) -> None:
    # Every unpickler (pickle, torch.load's, cloudpickle) resolves globals through
    # find_class, which raises this audit event: that is where unpickling runs code.
    if event == "pickle.find_class" and _ARMED:
        raise Unpickled(f"unpickled a global: {args}")


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make torch's loaders and every unpickler's global lookup raise while the test runs.

    pickle.load/loads themselves are not patched: a module first imported under the patch
    (Ray's serialization does `loads = pickle.loads`) would keep the raising stand-in for
    the rest of the session. The audit hook sees every unpickler anyway, and an unpickle
    that resolves no global cannot run code."""
    if not getattr(sys, "_cold_ray_audit", False):
        sys.addaudithook(_audit)  # cannot be removed; inert unless armed
        sys._cold_ray_audit = True

    def refuse(*args, **kwargs):
        raise Unpickled("something called a torch loader")

    for mod in (torch, torch.serialization, torch.jit):
        monkeypatch.setattr(mod, "load", refuse)
    _ARMED.append(True)
    yield
    _ARMED.clear()


def test_no_unpickling_guard_works(no_unpickling, tmp_path):
    with pytest.raises(Unpickled):
        torch.load("whatever.pt")
    data = pickle.dumps(_Payload(tmp_path / "ran"))
    for unpickle in (pickle.loads, lambda d: pickle.Unpickler(io.BytesIO(d)).load()):
        with pytest.raises(Unpickled):
            unpickle(data)
    assert not (tmp_path / "ran").exists()


def test_model_and_adapter_loads_never_unpickle(no_unpickling, tmp_path, tiny_llama, tiny_adapters):
    """The app's start (model args, startup adapters validated into the registry), a replica's
    model load, and adapter loads on demand off the step thread all run with unpickling
    disabled."""
    cfg = AppArgs(
        registry=str(tmp_path / "reg.sqlite"),
        adapters=[{"name": f"a{i}", "source": str(p)} for i, p in enumerate(tiny_adapters)],
        engine=dict(
            model=str(tiny_llama), max_lora_rank=8, max_rows=4, max_model_len=64, max_loras=2
        ),
    )
    prepare(cfg)
    registry = Registry(cfg.registry_path())
    core = EngineCore(cfg.engine_config(), resolver=registry.resolver())
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for name in ("a0", "a1", "a2", "a0"):  # three loads into two slots, then one reload
        assert core.generate([[5, 6, 7]], params, adapter=name)[0]["completion_tokens"] == 3
    assert core.slots.loads >= 4
    core.shutdown()


def test_gguf_conversion_never_unpickles(no_unpickling, tmp_path, tiny_llama, monkeypatch):
    """A GGUF model (the default model is one) is read, dequantized and converted, tokenizer
    included, with unpickling disabled, and the converted folder then loads the same way."""
    from cold_ray.config import EngineConfig
    from tests.test_gguf import write_gguf

    monkeypatch.setenv("COLD_RAY_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tiny_llama, tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    core = EngineCore(EngineConfig(model=str(gguf), max_rows=2, max_model_len=64))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    assert core.generate(["the quick brown fox"], params)[0]["completion_tokens"] == 3
    core.shutdown()


class _Payload:
    """Unpickling this creates `marker`: stands for any code a pickle may run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("with_safetensors", [False, True])
def test_pickled_adapter_payload_never_runs(tmp_path, tiny_llama, tiny_adapters, with_safetensors):
    """A real malicious `adapter_model.bin`: refused when it is the only weights file, ignored
    beside safetensors; its payload never runs either way."""
    marker = tmp_path / "pwned"
    d = tmp_path / "evil"
    shutil.copytree(tiny_adapters[0], d)
    if not with_safetensors:
        (d / WEIGHTS_FILE).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    args = read_model_args(tiny_llama)
    reg = Registry(tmp_path / "reg.sqlite")
    if with_safetensors:
        assert load_peft_adapter(d, args, max_rank=8).rank == 8
        assert reg.add("evil", d, args=args, max_rank=8).name == "evil"
    else:
        for load in (
            lambda: load_peft_adapter(d, args, max_rank=8),
            lambda: reg.add("evil", d, args=args, max_rank=8),
        ):
            with pytest.raises(AdapterError, match="pickled weights .*arbitrary code"):
                load()
        assert reg.list() == []
    assert not marker.exists()


def test_default_adapter_roots_keep_server_files_out(tmp_path, tiny_llama, monkeypatch):
    """With no `adapter_roots` configured, the admin API's registry reads only under
    ~/.cache/cold-ray/adapters; asking for a server file gets the same answer whether or not
    it exists (no probing)."""
    monkeypatch.setenv("COLD_RAY_CACHE", str(tmp_path / "cache"))
    roots = AppArgs().roots()
    assert roots == [str(tmp_path / "cache" / "adapters")]
    reg = Registry(tmp_path / "reg.sqlite", allowed_roots=roots)  # as the ingress builds it
    args = read_model_args(tiny_llama)
    messages = {}
    for source in (
        "/etc/passwd",
        "/etc/no-such-file",
        "file:///etc/passwd",
        "/etc",
        str(tmp_path / "cache" / "adapters" / ".." / ".." / "x"),
        "http://169.254.169.254/latest/meta-data",
        "memory://x/y",
    ):
        with pytest.raises(AdapterError) as e:
            reg.add("x", source, args=args, max_rank=8)
        messages[source] = str(e.value)
        assert "root:" not in messages[source]
    assert "outside the allowed adapter roots" in messages["/etc/passwd"]
    assert (
        messages["/etc/passwd"].replace("passwd", "no-such-file") == messages["/etc/no-such-file"]
    )
    assert "not allowed" in messages["http://169.254.169.254/latest/meta-data"]
    assert reg.list() == []
