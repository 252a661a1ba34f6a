"""Safe defaults on a real Serve instance: a server whose HTTP host is not loopback refuses to
start while its registry writes or its completions would be open (an admin or a client token
missing), says what to set, and starts with both tokens or the explicit opt-outs; a failed app
build fails once, with its reason.

Serve runs with its HTTP proxy disabled, so nothing listens on 0.0.0.0 during the test: the
app sees the host from Serve's http_options all the same (as it would under `serve run`)."""

import os
import time

import pytest

from cold_ray.serve.app_args import AppArgs
from tests.serve_util import free_port, wait_for

pytestmark = pytest.mark.serve
ADMIN_ENV, API_ENV = "COLD_EXPOSURE_ADMIN_KEY", "COLD_EXPOSURE_API_KEY"


@pytest.fixture(scope="module")
def exposed(tmp_path_factory, tiny_llama):
    """Ray + Serve whose http_options say 0.0.0.0 (proxy disabled), and app args for it."""
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("exposure")
    os.environ[ADMIN_ENV] = ""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            proxy_location="Disabled", http_options={"host": "0.0.0.0", "port": free_port()}
        )
        engine = {"model": str(tiny_llama), "max_rows": 4, "max_model_len": 128}
        args = {
            "engine": engine,
            "registry": str(root / "reg.sqlite"),
            "api_key_env": API_ENV,
            "admin_key_env": ADMIN_ENV,
        }
        yield args
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop(ADMIN_ENV, None)


ZERO_CPU = {"ray_actor_options": {"num_cpus": 0}}


@pytest.mark.parametrize(
    "env,missing",
    [
        ({}, [ADMIN_ENV, API_ENV]),
        ({ADMIN_ENV: "s3cret-admin"}, [API_ENV]),
        ({API_ENV: "s3cret-client"}, [ADMIN_ENV]),
    ],
    ids=["no token", "admin token only", "client token only"],
)
def test_exposed_without_both_tokens_is_refused_with_what_to_set(
    exposed, env, missing, monkeypatch
):
    from ray.serve.exceptions import RayServeException

    from cold_ray.serve.app import build_app

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RayServeException) as err:
        build_app(exposed)
    message = str(err.value)
    assert "'0.0.0.0'" in message and f"Set {' and '.join(missing)} " in message
    assert ("allow_unauthenticated_admin: true" in message) == (ADMIN_ENV in missing)
    assert ("allow_unauthenticated_clients: true" in message) == (API_ENV in missing)


def test_ingress_refuses_too_when_composed_directly(exposed):
    """Python callers that skip build_app meet the same check when the ingress starts."""
    from ray import serve

    from cold_ray.serve.app import compose

    with pytest.raises(Exception, match="Failed to update the deployments.*ColdIngress"):
        serve.run(
            compose(AppArgs(**exposed), ZERO_CPU, ZERO_CPU), name="direct", route_prefix="/direct"
        )
    why = serve.status().applications["direct"].deployments["ColdIngress"].message
    assert "cold-ray cannot start" in why and "allow_unauthenticated_admin" in why, why
    serve.delete("direct")


OPT_OUTS = {"allow_unauthenticated_admin": True, "allow_unauthenticated_clients": True}


@pytest.mark.parametrize(
    "extra,env",
    [
        (OPT_OUTS, {}),
        ({}, {ADMIN_ENV: "s3cret-admin", API_ENV: "s3cret-client"}),
        ({"admin_api": False}, {API_ENV: "s3cret-client"}),
    ],
    ids=["opt-outs", "both tokens", "no admin api"],
)
def test_exposed_starts_with_opt_outs_or_both_tokens(exposed, extra, env, monkeypatch):
    from ray import serve

    from cold_ray.serve.app import build_app, compose

    for k, v in env.items():
        monkeypatch.setenv(k, v)  # what build_app (this process) reads
    build_app({**exposed, **extra})  # no exception: it may start
    # the ingress replica checks again with its own environment
    ingress = {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}}}
    serve.run(
        compose(AppArgs(**exposed, **extra), ZERO_CPU, ingress), name="ok", route_prefix="/ok"
    )
    assert serve.status().applications["ok"].status == "RUNNING"
    serve.delete("ok")


def test_failed_build_fails_once_with_its_reason(exposed, tmp_path):
    """Through Serve's own build task (what `serve run config.yaml` does): the reason is the
    application's status message at once, with no retried builds."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    missing = tmp_path / "no-such-model"
    config = ServeDeploySchema.model_validate(
        {
            "applications": [
                {
                    "name": "broken",
                    "route_prefix": "/broken",
                    "import_path": "cold_ray.serve:build_app",
                    "args": {
                        **exposed,
                        "engine": {**exposed["engine"], "model": str(missing)},
                        **OPT_OUTS,
                    },
                }
            ]
        }
    )
    started = time.monotonic()
    _get_global_client().deploy_apps(config, _blocking=False)

    def failed():
        app = serve.status().applications.get("broken")
        return app if app is not None and app.status == "DEPLOY_FAILED" else None

    app = wait_for(failed, timeout=120, interval=0.5, what="the app build to fail")
    assert "cold-ray cannot start" in app.message and str(missing) in app.message
    assert "does not exist" in app.message and "Traceback" not in app.message
    assert time.monotonic() - started < 60
    serve.delete("broken")
