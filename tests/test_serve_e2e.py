"""The real thing: `serve run deployments/cold.yaml` (SmolLM2 + the demo adapter) in a
subprocess, spoken to over HTTP with the official OpenAI client, then stopped with SIGINT
leaving no Ray process behind. Only the port and the registry file are changed."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve_util import free_port, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deployments" / "adapters" / "arith-demo"


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            environ = (proc / "environ").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if text in cmdline or text in environ:
            pids.append(int(proc.name))
    return pids


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT as a terminal gives it: a suite started in the background of a script (`cmd &`)
    inherits SIGINT ignored, and `serve run` would then never see the Ctrl-C under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def served():
    assert (DEMO / "adapter_model.safetensors").exists(), f"the demo adapter is missing: {DEMO}"
    from cold_ray.model.loader import default_model_path

    default_model_path()  # fetched once outside the timed start (a no-op when cached)
    # A short private Ray temp dir: unix socket paths must stay under ~100 characters, and
    # every process of this cluster carries it, which is how the test finds leftovers.
    tmp = Path(tempfile.mkdtemp(prefix="crs", dir="/tmp"))
    config = yaml.safe_load((ROOT / "deployments" / "cold.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["registry"] = str(tmp / "registry.sqlite")
    (tmp / "cold.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_TMPDIR": str(tmp),
        "OMP_NUM_THREADS": "1",
        "COLD_RAY_API_KEY": "",
        "COLD_RAY_ADMIN_KEY": "",
    }
    serve_bin = Path(sys.executable).with_name("serve")
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(tmp / "cold.yaml")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"serve run exited: {(tmp / 'serve.log').read_text()[-4000:]}")
        try:
            r = httpx.get(url + "/v1/models", timeout=5)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and any(m["id"] == "arith-demo" for m in r.json()["data"])

    try:
        started = time.monotonic()
        wait_for(ready, timeout=300, interval=1, what="serve run to answer")
        yield {"url": url, "proc": proc, "tmp": tmp, "start_s": time.monotonic() - started}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=30)
        log.close()


def test_cold_yaml_serves_the_demo_adapter(served):
    import openai

    from cold_ray.adapters.demo_task import format_prompt, make_split

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)
    models = [m for m in client.models.list().data]
    assert models[0].id == "SmolLM2-135M-Instruct" and models[0].parent is None
    demo = next(m for m in models if m.id == "arith-demo")
    assert demo.parent == "SmolLM2-135M-Instruct" and demo.root == str(DEMO.resolve())

    prompt = format_prompt(make_split("test", 1)[0]["question"])
    cold = client.completions.create(
        model="arith-demo", prompt=prompt, max_tokens=24, temperature=0
    )
    assert cold.model_extra["cold"]["decoding"] == "cold" and cold.choices[0].text.strip()
    plain = client.completions.create(
        model="arith-demo", prompt=prompt, max_tokens=24, temperature=0, extra_body={"cold": False}
    )
    assert plain.model_extra["cold"] == {"decoding": "plain", "alpha": None, "beta": None}
    assert plain.choices[0].text.strip()

    chunks = list(
        client.chat.completions.create(
            model="arith-demo",
            messages=[{"role": "user", "content": "What is 2 + 3?"}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text.strip()
    assert chunks[0].model_extra["cold"]["decoding"] == "cold"


def test_sigint_leaves_no_ray_processes(served):
    proc, tmp = served["proc"], served["tmp"]
    assert processes_mentioning(str(tmp))  # the cluster is up and findable
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=90)
    wait_for(
        lambda: not processes_mentioning(str(tmp)),
        timeout=30,
        interval=0.5,
        what="Ray processes to exit",
    )
    shutil.rmtree(tmp, ignore_errors=True)
