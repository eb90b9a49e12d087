"""Shipped run configs and the cluster launcher config stay valid."""

from pathlib import Path

import pytest
import yaml

from raybench.config import build_config
from raybench.data import load_dataset
from raybench.data.datasets import _NEEDS_ROOT
from raybench.pipeline import plan_run
from raybench.plan import plan_method_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_job_configs_are_valid_and_plan(path):
    config = build_config(str(path))
    assert plan_method_runs(config)  # every method and parameter name in the file exists
    if config.dataset in _NEEDS_ROOT:
        pytest.skip("needs downloaded data; tests/test_cifar10.py plans it on a folder it builds")
    plan = plan_run(config, load_dataset(config.dataset))
    assert plan.units


def test_cluster_yaml_passes_rays_own_validation():
    # A private API of the pinned Ray 2.60 (docs/design.md#jobs-and-clusters): the same checks `ray up` runs, offline.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu"]["resources"]["GPU"] == 1


def test_cluster_validation_rejects_a_broken_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(Exception, match="integer"):
        validate_config(prepare_config(config))
