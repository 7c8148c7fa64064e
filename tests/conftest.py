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
# The other tests run in the order of how busy they keep the machine: first those
# marked `waiting` (one trial at a time, or a process waited on, leaving a core idle),
# whose idle moments the checks fill as they start; last those marked `saturating`
# (every core busy on their own: the demo's trials, as many at a time as fit), which
# the checks would only slow.
BESIDE = pytest.StashKey[dict]()


def running_order(item) -> tuple:
    """Where a test runs: by its markers; sorting is stable, so each group keeps its order."""
    load = 0 if item.get_closest_marker("waiting") else 2 if item.get_closest_marker("saturating") else 1
    return item.get_closest_marker("beside") is not None, load


def pytest_collection_modifyitems(items):
    items.sort(key=running_order)


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
