import pytest

from lamp.synth import write_synthetic


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session."""
    import ray

    from grid.cluster import start_local_ray

    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small synthetic LaMP_2 (60 users), once per module; a module may define its own."""
    out = tmp_path_factory.mktemp("data")
    write_synthetic(out, tasks=["LaMP_2"], users=60, seed=2)
    return out


# --- checks that run beside the other tests --------------------------------------------
# A check that spends most of its minutes waiting (nodes joining, an autoscaler
# starting one, a killed node being noticed) is marked `beside(start)`: start()
# begins it, as processes of its own, when the session begins; the other tests run
# meanwhile; and its test, moved to the end, reads what it left (fixture `beside`,
# a tests.beside.Check).
# A test marked `saturating` keeps every core busy on its own (the demo's trials, as
# many at a time as fit), so it runs after the others: the checks then fill the idle
# moments of the tests that wait on one trial at a time, not slow the demo.
BESIDE = pytest.StashKey[dict]()


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: (item.get_closest_marker("beside") is not None,  # stable: the others keep order
                                 item.get_closest_marker("saturating") is not None))


def pytest_collection_finish(session):
    session.stash[BESIDE] = {item.nodeid: item.get_closest_marker("beside").args[0]()
                             for item in session.items if item.get_closest_marker("beside")}


def pytest_sessionfinish(session):
    for check in session.stash.get(BESIDE, {}).values():
        if check is not None:
            check.stop()


@pytest.fixture
def beside(request):
    """What this test's `beside` marker started with the session (None: it could not start)."""
    return request.session.stash[BESIDE][request.node.nodeid]
