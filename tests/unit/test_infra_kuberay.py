"""Ray on Kubernetes: one image tag and Ray version everywhere, every RayJob on the RayCluster's shape and
entrypoint rules, and scheduled retraining that never overlaps (CronJob and RayCronJob)."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from infra_harness import (
    CRONJOB,
    DOCKERFILE,
    IMAGE,
    INFRA,
    K8S_DOCS,
    LAUNCHER,
    PINS,
    RAYCLUSTER,
    RAYCRONJOB,
    RAYJOB,
    RAYJOB_SPECS,
    SCHEDULED_RAYJOB,
    SCHEDULER_CONFIGMAP,
    TRACKING_URI,
    commands_in,
    containers,
    one_doc,
    parse_command,
)

DAY_S = 24 * 3600


def test_image_is_one_tag_everywhere_and_follows_the_project_version():
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    assert set(re.findall(r"ghcr\.io/convllava/convllava:[\w.-]+", text)) == {IMAGE}
    ray_crs = [RAYCLUSTER, RAYJOB, RAYCRONJOB, SCHEDULED_RAYJOB, CRONJOB]
    assert {c["image"] for doc in ray_crs for c in containers(doc)} == {IMAGE}
    assert yaml.safe_load(LAUNCHER.read_text())["docker"]["image"] == IMAGE
    for src, doc in K8S_DOCS:
        for c in containers(doc):
            assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{src}: unpinned image {c['image']}"


def test_ray_version_agrees_with_pyproject_and_the_base_image():
    assert {spec["rayClusterSpec"]["rayVersion"] for _, spec in RAYJOB_SPECS} == {PINS["ray"]}
    assert RAYCLUSTER["spec"]["rayVersion"] == PINS["ray"]
    assert re.search(rf"^FROM rayproject/ray:{re.escape(PINS['ray'])}-py311-gpu$", DOCKERFILE.read_text(), re.M)


@pytest.mark.parametrize("where, spec", RAYJOB_SPECS, ids=[w for w, _ in RAYJOB_SPECS])
def test_every_rayjob_runs_on_the_raycluster_shape(where, spec):
    assert spec["rayClusterSpec"] == RAYCLUSTER["spec"], f"{where}: rayClusterSpec drifted from raycluster.yaml"


def test_raycluster_head_and_gpu_workers():
    spec = RAYCLUSTER["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert 8265 in [p["containerPort"] for p in head_container["ports"]]
    assert "nvidia.com/gpu" not in json.dumps(head_container["resources"])
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in json.dumps(g)]
    assert len(gpu) == 1
    (gpu_container,) = gpu[0]["template"]["spec"]["containers"]
    assert (
        gpu_container["resources"]["requests"]["nvidia.com/gpu"]
        == gpu_container["resources"]["limits"]["nvidia.com/gpu"]
        == 8
    )
    assert 1 <= gpu[0]["minReplicas"] <= gpu[0]["replicas"] <= gpu[0]["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string: a YAML number there is rejected by the CRD.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert volumes[mounts["/mnt/work"]]["persistentVolumeClaim"]["claimName"] == "convllava-work"
            assert {"name": "MLFLOW_TRACKING_URI", "value": TRACKING_URI} in container["env"]
            assert {"secretRef": {"name": "convllava-s3"}} in container["envFrom"]
    pvc = one_doc("PersistentVolumeClaim", "convllava-work")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # head and every worker mount it at once


@pytest.mark.parametrize("where, spec", RAYJOB_SPECS, ids=[w for w, _ in RAYJOB_SPECS])
def test_rayjob_entrypoints(where, spec):
    (argv,) = commands_in(spec["entrypoint"])
    (ns, *_) = parse_command(argv[1:], where)
    assert (ns.subcommand, getattr(ns, "action", None)) == (
        ("pipeline", "run") if where == "rayjob.yaml" else ("retrain", None)
    )
    assert ns.tracking_uri == TRACKING_URI and ns.workdir == "/mnt/work"
    # KubeRay pastes the entrypoint unquoted into the submitter's shell line (`ray job submit ... -- ENTRYPOINT ;`):
    # a `cd X && convllava ...` would submit `cd X` and run convllava in the submitter pod itself.
    assert shlex.split(spec["entrypoint"]) == argv and not re.search(r"[;&|`$<>()]", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_ray_pods_run_in_the_repository_copy_of_the_image():
    """The driver runs in the head container's working directory (ray start's cwd, which Ray jobs inherit): the
    image's WORKDIR, into which the repository is copied, so relative --config paths resolve as in a checkout."""
    lines = DOCKERFILE.read_text().splitlines()
    (workdir,) = [line.split()[1] for line in lines if line.startswith("WORKDIR ")]
    assert lines.index(f"WORKDIR {workdir}") < lines.index("COPY --chown=ray:users . .")
    for _, spec in RAYJOB_SPECS:
        for c in containers(spec["rayClusterSpec"]):
            assert c.get("workingDir", workdir) == workdir


def _period_s(schedule: str) -> int:
    assert re.fullmatch(r"\d+ \d+ \* \* \*", schedule), f"{schedule!r}: only daily schedules are checked here"
    return DAY_S


def test_cronjob_forbids_overlapping_runs():
    spec = CRONJOB["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    # The waiting pod outlives the RayJob it waits for, and both end within one period.
    assert (
        SCHEDULED_RAYJOB["spec"]["activeDeadlineSeconds"] <= job["activeDeadlineSeconds"] <= _period_s(spec["schedule"])
    )
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["command"] == ["python", f"{mount}/schedule.py"]
    assert f'"{mount}/rayjob.yaml"' in SCHEDULER_CONFIGMAP["data"]["schedule.py"]
    # RBAC: the pod's ServiceAccount may create, get and list RayJobs in its namespace, nothing else.
    role = one_doc("Role", "convllava-retrain-scheduler")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    binding = one_doc("RoleBinding", "convllava-retrain-scheduler")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": CRONJOB["metadata"]["namespace"]}
    ]
    assert SCHEDULED_RAYJOB["metadata"]["generateName"] and "name" not in SCHEDULED_RAYJOB["metadata"]


def test_raycronjob_uses_only_fields_kuberay_defines():
    """KubeRay's RayCronJobSpec is schedule, jobTemplate, suspend and (1.7.0+) timeZone, with no concurrencyPolicy:
    an unknown field fails `kubectl apply`. Overlap is prevented by a RayJob deadline shorter than the period."""
    spec = RAYCRONJOB["spec"]
    assert set(spec) <= {"schedule", "jobTemplate", "suspend", "timeZone"}
    assert "concurrencyPolicy" not in spec
    assert spec["jobTemplate"]["activeDeadlineSeconds"] < _period_s(spec["schedule"])
    assert len(RAYCRONJOB["metadata"]["name"]) <= 36  # KubeRay appends -<minutes> and caps RayJob names at 47
