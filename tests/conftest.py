import logging

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session."""
    import ray

    from grid.cluster import LOCAL_ENV, WORKER_ENV

    ray.init(num_cpus=2, logging_level=logging.WARNING,
             runtime_env={"env_vars": {**WORKER_ENV, **LOCAL_ENV}})
    yield ray
    ray.shutdown()
