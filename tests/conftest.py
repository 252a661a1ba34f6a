import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import make_peft_adapter, make_tiny_model  # noqa: E402

torch.set_num_threads(1)

# pg_server, pg_url and registry_target for every test file: one PostgreSQL server a session.
pytest_plugins = ["tests.postgres"]


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
    parser.addoption("--fuzz-seeds", type=int, default=None,
                     help="seeds per randomized differential test (default: the CI slice)")  # fmt: skip
