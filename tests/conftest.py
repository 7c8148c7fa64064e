import logging

import pytest

from lamp.synth import write_synthetic


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session."""
    import ray

    from grid.cluster import LOCAL_ENV, WORKER_ENV

    ray.init(address="local", num_cpus=2, logging_level=logging.WARNING,
             runtime_env={"env_vars": {**WORKER_ENV, **LOCAL_ENV}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small synthetic LaMP_2 (60 users), once per module; a module may define its own."""
    out = tmp_path_factory.mktemp("data")
    write_synthetic(out, tasks=["LaMP_2"], users=60, seed=2)
    return out
