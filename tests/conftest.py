import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DRPO_CACHE", str(ROOT / ".cache" / "drpo"))
sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE real local Ray cluster for the whole session (a head node with 2 logical CPUs; tests may add nodes).

    Actors ask for fractional CPUs, so everything fits on 2 cores; node health checks are fast so a
    removed node is noticed in seconds, not the default half minute.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()
