"""Faults on purpose, against the running app on a local Ray cluster (tiny random model):
client disconnects (non-streaming, and while queued), an adapter file corrupted after
registration, a torn copy of a remote adapter in the host cache, hostile adapter files and
sources sent to the admin API, a request that times out in the engine's queue, an outage of
the PostgreSQL registry, an engine replica killed mid-stream, and a restart of the whole app
on the same registry.

The tests share one app and run in file order; the restart comes last but one and the log
check last."""

import json
import os
import shutil
import signal
import socket
import struct
import threading
import time

import httpx
import pytest

from cold_ray.adapters.peft import weights_sha256
from cold_ray.adapters.sources import cache_key
from cold_ray.benchmarks.serving.registry import serve_folder
from cold_ray.serve.app_args import AppArgs
from tests.serve_util import free_port, local_ray, long_tiny_model, ray_logs_containing, wait_for
from tests.test_serve_api import assert_openai_error

pytestmark = pytest.mark.serve

API_KEY, ADMIN_KEY = "fault-client-token-5772", "fault-admin-token-1618"
ENV = {"COLD_FAULT_API_KEY": API_KEY, "COLD_FAULT_ADMIN_KEY": ADMIN_KEY}
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = "the quick brown fox"
LONG = {
    "model": "startup",
    "prompt": PROMPT,
    "max_tokens": 4000,
    "ignore_eos": True,
    "temperature": 0,
}  # CoLD by default: two rows
APP = {"name": "faults", "route_prefix": "/"}
ZERO_CPU = {"ray_actor_options": {"num_cpus": 0}}


def deploy(cfg: AppArgs) -> None:
    """What `serve run` does with the YAML: prepare (fetch, register startup adapters), run."""
    from ray import serve

    from cold_ray.serve.app import compose, prepare

    prepare(cfg)
    serve.run(compose(cfg, ZERO_CPU), **APP)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_llama, tiny_adapters):
    root = tmp_path_factory.mktemp("faults")
    model = long_tiny_model(tiny_llama, root / "tiny-long")
    uploads = root / "uploads"  # the admin API's adapter root on this machine
    store = root / "store"  # and an object store over HTTP (remote sources, fetched to blobs/)
    for i, a in enumerate(tiny_adapters):
        shutil.copytree(a, uploads / f"a{i}")
        shutil.copytree(a, store / f"a{i}")
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # replicas inherit the environment of the cluster's start
    try:
        with serve_folder(store) as files, local_ray() as url:
            cfg = AppArgs(
                served_model_name="tiny",
                registry=str(root / "reg.sqlite"),
                adapters=[{"name": "startup", "source": str(tiny_adapters[0])}],
                adapter_roots=[str(uploads), files],
                adapter_schemes=["file", "http", "s3"],
                api_key_env="COLD_FAULT_API_KEY",
                admin_key_env="COLD_FAULT_ADMIN_KEY",
                engine=dict(
                    model=str(model), max_rows=8, max_model_len=4096, max_lora_rank=8, max_loras=2
                ),
            )
            deploy(cfg)
            yield {
                "url": url,
                "cfg": cfg,
                "root": root,
                "uploads": uploads,
                "files": files,
                "store": store,
                "adapters": tiny_adapters,
            }
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def engine():
    from ray import serve

    return serve.get_deployment_handle("ColdEngine", app_name=APP["name"])


def stats() -> dict:
    return engine().stats.remote().result()


def replica_info() -> dict:
    return engine().info.remote().result()


def post(app, path="/v1/completions", headers=CLIENT, timeout=60, **body):
    body.setdefault("prompt", PROMPT)
    body.setdefault("temperature", 0)
    body.setdefault("max_tokens", 8)
    with httpx.Client(base_url=app["url"], timeout=timeout) as c:
        return c.post(path, json=body, headers=headers)


def admin(app, method, path, timeout=60, **kwargs):
    with httpx.Client(base_url=app["url"], timeout=timeout) as c:
        return c.request(method, path, headers=ADMIN, **kwargs)


def adapter_names(app) -> list[str]:
    with httpx.Client(base_url=app["url"], timeout=60) as c:
        return [a["id"] for a in c.get("/v1/adapters", headers=CLIENT).json()["data"]]


def idle_stats() -> dict | None:
    """The engine's stats once no row, cache slot or queue place is in use, else None."""
    s = stats()
    idle = s["running_rows"] == 0 and s["waiting_requests"] == 0 and s["kv_cache_usage"] == 0
    return s if idle else None


class RawRequest:
    """A non-streaming POST on a bare socket, so the test decides when the client vanishes."""

    def __init__(self, app, body: dict):
        host, port = app["url"].removeprefix("http://").split(":")
        data = json.dumps(body).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(head.encode() + data)

    def vanish(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# ---- client disconnects ---------------------------------------------------------------------


def test_vanished_clients_free_rows_kv_and_queue_at_once(app):
    """Streaming disconnects are in test_serve_api; here non-streaming clients vanish, one
    while its request waits in the engine's queue (8 rows = 4 CoLD requests running)."""
    tokens0 = stats()["generated_tokens"]
    running = []
    for i in range(4):
        running.append(RawRequest(app, LONG))
        rows = 2 * (i + 1)
        wait_for(lambda rows=rows: stats()["running_rows"] == rows, what=f"{rows} rows running")
    s = stats()
    assert s["kv_cache_usage"] == 1.0 and s["waiting_requests"] == 0
    queued = RawRequest(app, LONG)
    wait_for(lambda: stats()["waiting_requests"] == 1, what="a request queued")
    queued.vanish()
    wait_for(lambda: stats()["waiting_requests"] == 0, timeout=15, what="queue slot freed")
    assert stats()["running_rows"] == 8  # the others run on
    for r in running:
        r.vanish()
    s = wait_for(idle_stats, timeout=15, what="rows, KV and queue back to zero")
    # freed long before anything finished: 4 × 4000 tokens would have been generated
    assert s["generated_tokens"] - tokens0 < 4000
    assert post(app, model="startup").status_code == 200


# ---- a corrupted adapter ----------------------------------------------------------------------


def test_adapter_corrupted_after_registration_fails_alone(app):
    for name, folder in (("victim", "a1"), ("bystander", "a2")):
        r = admin(
            app, "POST", "/v1/adapters", json={"name": name, "source": str(app["uploads"] / folder)}
        )
        assert r.status_code == 201, r.text
    pid = replica_info()["pid"]
    weights = app["uploads"] / "a1" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-16] + bytes(b ^ 0xFF for b in good[-16:]))  # flip tensor bytes
    try:
        for stream in (False, True):
            r = post(app, model="victim", stream=stream)
            err = assert_openai_error(r, 500)
            assert err["code"] == "adapter_load_failed"
            assert "changed since registration" in err["message"] and "sha256" in err["message"]
        for model in ("bystander", "startup", "tiny"):
            assert post(app, model=model).status_code == 200, model
    finally:
        weights.write_bytes(good)
    assert post(app, model="victim").status_code == 200  # a failed load poisons nothing
    assert replica_info()["pid"] == pid and idle_stats()


# ---- hostile adapter files and sources --------------------------------------------------------


def _rewrite_header(path, change) -> None:
    """Rewrite a safetensors file's JSON header with `change(header)`; data left as is."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def _first_lora_a(header: dict) -> dict:
    return header[next(k for k in header if "lora_A" in k)]


def test_hostile_adapter_sources_and_files_are_refused(app, tmp_path):
    """Through POST /v1/adapters with the admin token: no server file outside the adapter
    roots is read (paths, file://, traversal, symlinked folders and weights, other schemes),
    adapters with lying headers or wrong shapes are refused, and nothing is listed. Messages
    quote a source as sent, never as resolved on the server (where a link leads, the
    working directory behind /proc/self/cwd)."""
    from safetensors.torch import load_file, save_file

    up, src = app["uploads"], app["adapters"][0]
    shutil.copytree(src, up / "lying-header")
    _rewrite_header(
        up / "lying-header" / "adapter_model.safetensors",
        lambda h: _first_lora_a(h).__setitem__("shape", [64, 64]),
    )
    shutil.copytree(src, up / "lying-offsets")
    _rewrite_header(
        up / "lying-offsets" / "adapter_model.safetensors",
        lambda h: _first_lora_a(h).__setitem__("data_offsets", [0, 1 << 40]),
    )
    shutil.copytree(src, up / "wrong-shape")
    t = load_file(up / "wrong-shape" / "adapter_model.safetensors")
    key = next(k for k in t if "v_proj.lora_B" in k)
    t[key] = t[key][:-1].contiguous()
    save_file(t, up / "wrong-shape" / "adapter_model.safetensors")
    (up / "etc-link").symlink_to("/etc")
    (up / "passwd-weights").mkdir()
    shutil.copy(src / "adapter_config.json", up / "passwd-weights")
    (up / "passwd-weights" / "adapter_model.safetensors").symlink_to("/etc/passwd")
    outside = "outside the allowed adapter roots"
    cases = {
        "/etc/passwd": (400, outside),
        "file:///etc/passwd": (400, outside),
        "/etc": (400, outside),
        f"{up}/../../../../../etc/passwd": (400, outside),
        str(up / "etc-link"): (400, f"source '{up}/etc-link' is {outside}"),  # not where to
        "/proc/self/cwd/adapters": (400, f"source '/proc/self/cwd/adapters' is {outside}"),
        str(up / "passwd-weights"): (400, outside),
        "s3://some-bucket/adapters/x": (400, outside),  # an allowed scheme, not a root
        "http://169.254.169.254/latest/meta-data/": (400, outside),  # http: only the store
        "ftp://example.com/adapters/x": (400, "'ftp://' is not allowed"),
        f"zip://x::file://{up}/a0": (400, "chained fsspec URLs are not allowed"),
        "memory://adapters/x": (400, "'memory://' is not allowed"),
        str(up / "lying-header"): (422, "corrupt or truncated"),
        str(up / "lying-offsets"): (422, "corrupt or truncated"),
        str(up / "wrong-shape"): (422, "do not fit the base layer"),
    }
    before = adapter_names(app)
    passwd = open("/etc/passwd").read().splitlines()[0]
    for source, (status, needle) in cases.items():
        r = admin(app, "POST", "/v1/adapters", json={"name": "hostile", "source": source})
        err = assert_openai_error(r, status)
        assert needle in err["message"], (source, err)
        assert passwd not in r.text
        assert "'/etc" not in err["message"] or source.startswith(("/etc", "file:///etc"))
    assert adapter_names(app) == before
    assert post(app, model="startup").status_code == 200


def _hostile_folder(app, name: str, change) -> str:
    """A copy of a good adapter under the uploads root, broken by `change(folder)`."""
    folder = app["uploads"] / name
    shutil.copytree(app["adapters"][0], folder)
    change(folder)
    return str(folder)


def _config_with(**fields):
    def change(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | fields))

    return change


def _fifo(name: str):
    def change(folder):
        (folder / name).unlink()
        os.mkfifo(folder / name)

    return change


def _sparse_config(folder):
    """16 GiB of holes: reading it whole would exhaust any replica's memory."""
    with open(folder / "adapter_config.json", "r+b") as f:
        f.truncate(16 << 30)


def test_hostile_adapter_files_get_a_4xx_at_once(app):
    """Files that crashed (500) or hung a registration: configs of the wrong types, a FIFO in
    place of a file (its read would block forever), an unreadable source (a name too long:
    any OSError, as EACCES is for a server not running as root). Each gets a 4xx naming the
    file relative to the adapter and why, without a server path."""
    cases = {
        "alpha-null": (_config_with(alpha_pattern=None, lora_alpha=16), 201, None),
        "alpha-list": (_config_with(alpha_pattern=[1, 2]), 422, "alpha_pattern"),
        "base-list": (
            _config_with(base_model_name_or_path=["a", "b"]),
            422,
            "base_model_name_or_path",
        ),
        "rslora-str": (_config_with(use_rslora="yes"), 422, "use_rslora"),
        "fifo-weights": (
            _fifo("adapter_model.safetensors"),
            422,
            "adapter_model.safetensors is not a regular file",
        ),
        "fifo-config": (
            _fifo("adapter_config.json"),
            422,
            "adapter_config.json is not a regular file",
        ),
    }
    before = adapter_names(app)
    for name, (change, status, needle) in cases.items():
        source = _hostile_folder(app, name, change)
        r = admin(
            app, "POST", "/v1/adapters", json={"name": name, "source": source}, timeout=30
        )  # a hang fails as a ReadTimeout
        assert r.status_code == status, (name, r.text)
        if needle is not None:
            err = assert_openai_error(r, status)
            assert needle in err["message"] and str(app["root"]) not in err["message"], err
    assert admin(app, "DELETE", "/v1/adapters/alpha-null").status_code == 200
    too_long = str(app["uploads"] / ("x" * 300))
    r = admin(app, "POST", "/v1/adapters", json={"name": "long", "source": too_long})
    err = assert_openai_error(r, 422)
    assert "name too long" in err["message"].lower() and str(app["root"]) not in err["message"]
    assert adapter_names(app) == before
    assert post(app, model="startup").status_code == 200


def _ingress_pid() -> int:
    """The ingress replica's process (Ray titles it after the deployment)."""
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            with open(f"/proc/{proc}/cmdline", "rb") as f:
                if b"ServeReplica:faults:ColdIngress" in f.read():
                    return int(proc)
        except OSError:
            continue
    raise AssertionError("no ingress replica process found")


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def test_config_size_is_checked_before_it_is_read(app):
    """A 16 GiB sparse adapter_config.json is refused by its size alone. The ingress runs with
    its address space capped 1 GiB above its current size meanwhile: reading the file whole
    (as it once was, before its size was checked) would raise MemoryError, a 500."""
    import resource

    source = _hostile_folder(app, "sparse-config", _sparse_config)
    pid = _ingress_pid()
    saved = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (_vm_size(pid) + (1 << 30), saved[1]))
    try:
        r = admin(app, "POST", "/v1/adapters", json={"name": "sparse", "source": source})
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, saved)
    err = assert_openai_error(r, 422)
    assert "adapter_config.json is 17179869184 bytes, over the limit" in err["message"], err


# ---- a torn copy in the host cache ----------------------------------------------------------


def test_torn_host_cache_copy_is_fetched_again(app):
    """A remote adapter is fetched into this host's cache (blobs/, named by content). A copy
    that no longer matches the registered checksum there (a torn write, a flipped bit) is
    checked when it is used and fetched again, not failed on this host for good."""
    r = admin(app, "POST", "/v1/adapters", json={"name": "remote", "source": f"{app['files']}/a1"})
    assert r.status_code == 201, r.text
    src = app["store"] / "a1"
    key = cache_key(weights_sha256(src), (src / "adapter_config.json").read_bytes())
    weights = app["root"] / "blobs" / key / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # torn
    try:
        r = post(app, model="remote")
        assert r.status_code == 200, r.text
        assert weights.read_bytes() == good
    finally:
        assert admin(app, "DELETE", "/v1/adapters/remote").status_code == 200


# ---- a request that waits too long in the engine's queue -------------------------------------


def test_request_timed_out_in_the_queue_is_a_retryable_503(app):
    """An engine of two rows (one CoLD request) whose requests may wait 1 s: the second
    request times out in the queue and gets 503 with Retry-After, which clients retry (a 4xx
    they would not)."""
    from ray import serve

    from cold_ray.serve.app import compose

    dump = app["cfg"].model_dump()
    engine = {**dump["engine"], "max_rows": 2, "request_timeout_s": 1.0}
    cfg = AppArgs.model_validate({**dump, "adapters": [], "engine": engine})
    serve.run(compose(cfg, ZERO_CPU, ZERO_CPU), name="tmo", route_prefix="/tmo")
    try:
        with httpx.Client(base_url=app["url"], timeout=60) as c:
            with c.stream(
                "POST", "/tmo/v1/completions", json={**LONG, "stream": True}, headers=CLIENT
            ) as busy:
                lines = busy.iter_lines()
                assert next(x for x in lines if x).startswith("data: ")  # both rows taken
                r = post(app, path="/tmo/v1/completions", model="startup")
        err = assert_openai_error(r, 503)
        assert err["code"] == "queue_timeout" and r.headers["retry-after"], (err, r.headers)
    finally:
        serve.delete("tmo")


# ---- an outage of the PostgreSQL registry -----------------------------------------------------


def _set_database_open(pg, db: str, open_: bool) -> None:
    """Open or close database `db` of the real server; closing also ends every connection
    to it (the replicas' pools and change feeds)."""
    import psycopg

    from tests.postgres import PASSWORD

    with psycopg.connect(pg.url("postgres"), password=PASSWORD, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS {'true' if open_ else 'false'}")
        if not open_:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)
            )


def test_registry_outage_is_a_503_and_known_adapters_keep_serving(app, request, monkeypatch):
    """The app on a real PostgreSQL registry whose database goes away (connections ended,
    new ones refused), then comes back: writes get 503 with Retry-After; /v1/models and known
    adapters are served from the in-memory snapshot; an unknown name, which the snapshot cannot
    settle while the change feed is down, is a 503, not a 404 or a 500; after the outage
    everything works again without a restart."""
    from ray import serve

    from cold_ray.serve.app import compose, prepare
    from tests.postgres import PASSWORD

    pg = request.getfixturevalue("pg_server")
    db = pg.create_database()
    monkeypatch.setenv("COLD_RAY_REGISTRY_PASSWORD", PASSWORD)  # this process (prepare)
    cfg = AppArgs.model_validate({**app["cfg"].model_dump(), "registry": pg.url(db)})
    replica = {"num_cpus": 0, "runtime_env": {"env_vars": {"COLD_RAY_REGISTRY_PASSWORD": PASSWORD}}}
    prepare(cfg)
    serve.run(
        compose(cfg, {"ray_actor_options": replica}, {"ray_actor_options": replica}),
        name="pgr",
        route_prefix="/pgr",
    )
    source = str(app["uploads"] / "a2")
    try:
        assert post(app, path="/pgr/v1/completions", model="startup").status_code == 200
        _set_database_open(pg, db, False)
        with httpx.Client(base_url=app["url"] + "/pgr", timeout=60) as c:
            r = c.post("/v1/adapters", json={"name": "new", "source": source}, headers=ADMIN)
            assert assert_openai_error(r, 503)["code"] == "registry_unavailable"
            assert r.headers["retry-after"]
            r = c.delete("/v1/adapters/startup", headers=ADMIN)
            assert assert_openai_error(r, 503)["code"] == "registry_unavailable"
            models = c.get("/v1/models", headers=CLIENT)
            assert models.status_code == 200, models.text
            assert [m["id"] for m in models.json()["data"]] == ["tiny", "startup"]
            assert post(app, path="/pgr/v1/completions", model="startup").status_code == 200
            unknown = wait_for(
                lambda: (
                    (x := post(app, path="/pgr/v1/completions", model="nope")).status_code != 404
                    and x
                ),
                timeout=30,
                what="the change feed seen down",
            )
            assert assert_openai_error(unknown, 503)["code"] == "registry_unavailable"
            assert unknown.headers["retry-after"]

            _set_database_open(pg, db, True)
            wait_for(
                lambda: (
                    c.post(
                        "/v1/adapters", json={"name": "new", "source": source}, headers=ADMIN
                    ).status_code
                    == 201
                ),
                timeout=60,
                interval=1,
                what="registry writes after the outage",
            )
            wait_for(
                lambda: post(app, path="/pgr/v1/completions", model="nope").status_code == 404,
                timeout=30,
                what="the change feed back",
            )
            assert post(app, path="/pgr/v1/completions", model="new").status_code == 200
    finally:
        _set_database_open(pg, db, True)
        serve.delete("pgr")


# ---- a replica killed mid-stream ------------------------------------------------------------


def test_replica_killed_mid_stream_fails_cleanly_and_is_replaced(app):
    """SIGKILL the engine replica while a stream and a non-streaming request run on it: both
    clients get an OpenAI-shaped 503 promptly (no hang), Serve starts a new replica (a new
    process), and new requests, streamed or not, succeed on it. (test_serve_api's
    test_engine_replica_killed_mid_stream covers the stream alone.)"""
    old = replica_info()
    results = []

    def whole():
        results.append(post(app, timeout=60, **LONG))

    with httpx.Client(base_url=app["url"], timeout=30) as c:  # a hang fails as a ReadTimeout
        with c.stream(
            "POST", "/v1/completions", json={**LONG, "stream": True}, headers=CLIENT
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            t = threading.Thread(target=whole)
            t.start()
            wait_for(lambda: stats()["running_requests"] == 2, what="both requests running")
            os.kill(old["pid"], signal.SIGKILL)
            killed = time.monotonic()
            events = [
                json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]"
                for x in lines
                if x.startswith("data: ")
            ]  # the rest of the stream
            stream_ended = time.monotonic() - killed
        t.join(timeout=60)
    assert events[-1] == "[DONE]", events[-3:]
    err = events[-2]["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["code"] == "engine_failed"
    assert stream_ended < 30
    (r2,) = results
    assert assert_openai_error(r2, 503)["code"] == "engine_failed"

    def served_by_new_replica():
        r = post(app, model="startup", timeout=30)
        return r.status_code == 200 and r.headers["x-cold-replica"] != old["replica"] and r

    r = wait_for(served_by_new_replica, timeout=120, interval=1, what="a replacement replica")
    new = replica_info()
    assert new["pid"] != old["pid"] and new["replica"] == r.headers["x-cold-replica"]
    assert post(app, model="startup", stream=True).status_code == 200


# ---- restart of the whole app ------------------------------------------------------------------


def test_app_restart_keeps_the_registry_and_reloads_adapters_on_demand(app):
    from ray import serve

    r = admin(
        app,
        "POST",
        "/v1/adapters",
        json={"name": "dyn", "source": str(app["uploads"] / "a2"), "beta": 0.7},
    )
    assert r.status_code == 201, r.text
    want = post(app, model="dyn", max_tokens=12, ignore_eos=True).json()
    with httpx.Client(base_url=app["url"], timeout=60) as c:
        catalog = c.get("/v1/adapters", headers=CLIENT).json()["data"]

    serve.shutdown()  # the whole app, proxy and controller included
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app["url"] = f"http://127.0.0.1:{port}"
    deploy(app["cfg"])  # startup adapters are registered again: must be a no-op

    with httpx.Client(base_url=app["url"], timeout=60) as c:
        assert c.get("/v1/adapters", headers=CLIENT).json()["data"] == catalog
    s = stats()
    assert s["adapter_loads"] == 0 and s["resident_adapters"] == []
    got = post(app, model="dyn", max_tokens=12, ignore_eos=True).json()
    assert got["choices"] == want["choices"] and got["cold"] == want["cold"]
    assert got["cold"]["beta"] == 0.7
    s = stats()
    assert s["adapter_loads"] == 1 and s["resident_adapters"] == ["dyn"]


def test_logs_never_contain_tokens_even_after_faults(app):
    """Every Ray log of this cluster (a killed replica, refused adapters, failed loads, a
    restart) is free of both tokens."""
    assert ray_logs_containing(API_KEY, ADMIN_KEY) == []
