"""cluster.yaml: valid for Ray's autoscaler (its own validator), and the facts a GPU run needs."""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw):
    """What `ray up` validates: the config merged with the AWS defaults, then checked."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def gpu_types(config):
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if node.get("resources", {}).get("GPU", 0) > 0
    }


def test_validates_with_rays_own_validator(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validator_rejects_a_broken_variant(raw):
    """The check above can fail: a typo'd key is refused by Ray's schema."""
    import jsonschema

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu.g5.xlarge"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_worker_types_have_gpus_and_sane_bounds(prepared):
    gpus = gpu_types(prepared)
    assert {n["node_config"]["InstanceType"] for n in gpus.values()} >= {
        "g5.xlarge",
        "g6e.xlarge",
        "p5.48xlarge",
    }
    for name, node in prepared["available_node_types"].items():
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    total_min = sum(n["min_workers"] for n in prepared["available_node_types"].values())
    assert total_min <= prepared["max_workers"]
    assert sum(n["max_workers"] for n in gpus.values()) > 0
    # Some GPU capacity is always there, so a submitted job starts without waiting.
    assert sum(n["min_workers"] for n in gpus.values()) >= 1
    # Each GPU node also has CPUs for its scoring actor (num_cpus=1) and tokenizers.
    for name, node in gpus.items():
        assert node["resources"]["CPU"] >= node["resources"]["GPU"] + 1, name


def test_head_is_a_cpu_node_kept_free_of_data_work(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0
    assert head["node_config"]["InstanceType"].startswith(("m6i", "m7i", "c6i", "r6i"))


def test_disks_and_object_store(prepared):
    for name, node in prepared["available_node_types"].items():
        sizes = [m["Ebs"]["VolumeSize"] for m in node["node_config"]["BlockDeviceMappings"]]
        assert max(sizes) >= 150, f"{name}: image, torch, model cache and spilling need disk"
    head_start = " ".join(prepared["head_start_ray_commands"])
    store = re.search(r"--object-store-memory[= ](\d+)", head_start)
    assert store and 1e9 <= int(store.group(1)) <= 0.5 * 32 * 1024**3  # m6i.2xlarge: 32 GiB


def test_cuda_pytorch_image_and_package_install(prepared, raw):
    assert re.fullmatch(r"rayproject/ray:2\.\d+\.\d+-py3\d+-gpu", prepared["docker"]["image"])
    import ray

    assert prepared["docker"]["image"].split(":")[1].startswith(ray.__version__)
    setup = prepared["setup_commands"]
    torch_step = next(c for c in setup if "torch" in c)
    install = next(c for c in setup if "pip install" in c and "torch" not in c)
    assert setup.index(torch_step) < setup.index(install)
    # The installed path is the repository, mounted from where `ray up` runs.
    target = shlex.split(install)[-1]
    assert raw["file_mounts"][target] == "."
    # Both installs take the versions CI tested.
    for step in (torch_step, install):
        assert f"-c {target}/constraints.txt" in step
    assert (REPO / "constraints.txt").exists()
    assert (REPO / "pyproject.toml").exists()
    # prepare_config merges setup_commands into the head's and the workers' setup.
    assert install in prepared["head_setup_commands"]
    assert install in prepared["worker_setup_commands"]


def test_ray_start_commands_join_the_head_with_token_auth(prepared):
    head = " ".join(prepared["head_start_ray_commands"])
    worker = " ".join(prepared["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "/home/ray/.ray/auth_token" in prepared["file_mounts"]
