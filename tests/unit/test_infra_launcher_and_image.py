"""The Ray cluster launcher config (validated by the installed Ray's schema) and the Docker image's
install order and ignores."""

from __future__ import annotations

import copy

import yaml
from infra_harness import COMMANDS, DOCKERFILE, INFRA, LAUNCHER, PINS, parse_command


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks before touching AWS
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["node_config"]["InstanceType"].startswith(("p4d.", "p5.", "g5.")) for t in types.values())
    assert config["setup_commands"] == []  # everything is in the image
    # The same /mnt/work as the KubeRay pods, so the same --workdir works on both.
    assert "-v /mnt/work:/mnt/work" in config["docker"]["run_options"]
    assert any("/mnt/work" in c and "mount -t nfs4" in c for c in config["initialization_commands"])
    text = LAUNCHER.read_text()
    assert "ray up infra/ray-cluster-launcher/aws.yaml" in text
    submits = [
        ns
        for src, argv in COMMANDS
        if src.startswith("infra/ray-cluster-launcher/")
        for ns in parse_command(argv[1:], src)[1:]
    ]
    assert submits and all((ns.subcommand, ns.action, ns.workdir) == ("pipeline", "run", "/mnt/work") for ns in submits)
    assert "convllava submit --address http://HEAD:8265 -- pipeline run --config jobs/configs/cluster.yaml" in text


def test_dockerfile_installs_in_the_makefiles_order():
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    runs = [line for line in lines if line.startswith("RUN ")]

    def index(*needles: str) -> int:
        (i,) = [i for i, line in enumerate(runs) if all(n in line for n in needles)]
        return i

    torch = index(f"torch=={PINS['torch']}", f"torchvision=={PINS['torchvision']}")
    deepspeed = index(
        f"deepspeed=={PINS['deepspeed']}",
        "DS_BUILD_OPS=0",
        "DS_BUILD_SHM_COMM=1",
        "--no-cache-dir",
        "--no-build-isolation",
    )
    project = index("pip install", "'.[gpu]'")
    assert torch < deepspeed < project
    assert (PINS["torch"], PINS["torchvision"], PINS["deepspeed"]) == ("2.14.1", "0.29.1", "0.19.8")
    env = " ".join(line for line in lines if line.startswith("ENV "))
    assert "HF_HUB_OFFLINE=1" in env
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {".git", ".venv", "work"} <= set(ignored)
    assert not [p for p in ignored if p.startswith(("jobs", "convllava", "pipelines", "pyproject"))]
