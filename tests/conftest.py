"""One small local Ray per test session (docs/design.md#connecting), started only if a test asks for it."""

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
os.environ.pop("RAY_ADDRESS", None)  # tests never join a cluster that happens to be configured

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # klom_reference and other test helpers


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
             log_to_driver=False, namespace="tests")
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
