"""The deployable manifests under infra/: every file parses, every `convllava` command in them is one the CLI
accepts and names config files that exist, and the pieces agree with each other and with pyproject.toml (image,
Ray version, cluster shape, MLflow address, secrets only by reference).

No Kubernetes, Docker or cloud account is needed: the checks use the real CLI parser, the cluster-launcher schema
of the installed Ray, the option parser of the installed MLflow server, and a fake Kubernetes API for the
retraining scheduler script that the CronJob runs.
"""

from __future__ import annotations

import argparse
import copy
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
LAUNCHER = INFRA / "ray-cluster-launcher" / "aws.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = dict(re.match(r"([A-Za-z0-9_-]+)(?:\[[^\]]*\])?==(\S+)", d).groups() for d in PYPROJECT["project"]["dependencies"]
            if "==" in d)  # fmt: skip
IMAGE = f"ghcr.io/convllava/convllava:{PYPROJECT['project']['version']}"
API_VERSIONS = {
    "Namespace": "v1", "PersistentVolumeClaim": "v1", "ServiceAccount": "v1", "ConfigMap": "v1", "Service": "v1",
    "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Deployment": "apps/v1", "StatefulSet": "apps/v1", "CronJob": "batch/v1",
    "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1",
}  # fmt: skip
DAY_S = 24 * 3600


# ---------------------------------------------------------------------------------------------- loading


def _load_documents() -> list[tuple[str, dict]]:
    """(source, document) for every YAML document under infra/, plus the YAML files embedded in ConfigMaps."""
    docs = []
    for path in sorted(INFRA.rglob("*.yaml")):
        rel = path.relative_to(ROOT).as_posix()
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            docs.append((f"{rel}[{i}]", doc))
            if doc.get("kind") == "ConfigMap":
                for key, value in doc.get("data", {}).items():
                    if key.endswith((".yaml", ".yml")):
                        docs += [(f"{rel}[{i}]:{key}", d) for d in yaml.safe_load_all(value) if d is not None]
    return docs


DOCS = _load_documents()
K8S_DOCS = [(src, d) for src, d in DOCS if not src.startswith("infra/ray-cluster-launcher/")]


def _one(kind: str, name: str | None = None, source: str | None = None) -> dict:
    found = [d for src, d in K8S_DOCS if d.get("kind") == kind and (source is None or source in src)
             and (name is None or name in (d["metadata"].get("name"), d["metadata"].get("generateName")))]  # fmt: skip
    assert len(found) == 1, f"expected one {kind} {name or ''} in infra/{source or ''}, found {len(found)}"
    return found[0]


def _walk(node) -> Iterator:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def _strings(node) -> Iterator[str]:
    """Every string value; a ConfigMap's files are skipped (its YAML files are documents of their own in DOCS)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict) and node.get("kind") != "ConfigMap":
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _containers(doc: dict) -> list[dict]:
    return [c for node in _walk(doc) if isinstance(node, dict)
            for key in ("containers", "initContainers") for c in node.get(key) or []]  # fmt: skip


RAYCLUSTER = _one("RayCluster")
RAYJOB = _one("RayJob", "convllava-pipeline-")
RAYCRONJOB = _one("RayCronJob")
CRONJOB = _one("CronJob")
SCHEDULER_CONFIGMAP = _one("ConfigMap", CRONJOB["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0][
    "configMap"]["name"])  # fmt: skip
SCHEDULED_RAYJOB = yaml.safe_load(SCHEDULER_CONFIGMAP["data"]["rayjob.yaml"])
# (where, RayJob spec) of every RayJob the manifests create, by hand or on a schedule
RAYJOB_SPECS = [("rayjob.yaml", RAYJOB["spec"]), ("raycronjob.yaml", RAYCRONJOB["spec"]["jobTemplate"]),
                ("cronjob-rayjob.yaml", SCHEDULED_RAYJOB["spec"])]  # fmt: skip
TRACKING_URI = RAYCLUSTER["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["value"]


# ------------------------------------------------------------------------------- convllava command lines

_SEGMENT_SPLIT = re.compile(r"\s*(?:&&|\|\||;|\|)\s*")
_ENV_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+")
_PROSE_MENTION = re.compile(r"`convllava\s+([^`]+)`")


def _commands_in(text: str) -> list[list[str]]:
    """Shell `convllava ...` invocations in text: segments (split at line ends, &&, ||, ;, |) that start with it."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        for segment in _SEGMENT_SPLIT.split(line.strip().removeprefix("$ ")):
            segment = _ENV_PREFIX.sub("", segment.strip())
            if segment.startswith("convllava "):
                found.append(shlex.split(segment, comments=True))
    return found


def _comment_text(text: str) -> str:
    return "\n".join(line.strip()[1:] for line in text.splitlines() if line.strip().startswith("#"))


def _collect_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for path in sorted(INFRA.rglob("*.yaml")):
        rel = path.relative_to(ROOT).as_posix()
        commands += [(f"{rel} (comment)", argv) for argv in _commands_in(_comment_text(path.read_text()))]
    for src, doc in DOCS:
        commands += [(src, argv) for text in _strings(doc) for argv in _commands_in(text)]
        for container in _containers(doc):
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv[:1] == ["convllava"]:
                commands.append((f"{src} container {container['name']}", argv))
    dockerfile = DOCKERFILE.read_text()
    commands += [("infra/docker/Dockerfile (comment)", argv) for argv in _commands_in(_comment_text(dockerfile))]
    for line in dockerfile.replace("\\\n", " ").splitlines():
        if line.startswith("RUN "):
            commands += [("infra/docker/Dockerfile RUN", argv) for argv in _commands_in(line[4:])]
        if line.startswith("CMD "):
            commands.append(("infra/docker/Dockerfile CMD", json.loads(line[4:])))
    readme = (INFRA / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, flags=re.S):
        commands += [("infra/README.md", argv) for argv in _commands_in(block)]
    return commands


COMMANDS = _collect_commands()
COMMAND_IDS = [f"{src}: {shlex.join(argv)}"[:110] for src, argv in COMMANDS]


def _parse(args: list[str], source: str) -> list[argparse.Namespace]:
    """Parse as `convllava` does; a `submit` command's payload is a convllava command itself and is parsed too."""
    try:
        ns = build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{source}: the CLI refuses `convllava {shlex.join(args)}` (exit {e.code}; see stderr)")
    parsed = [ns]
    if ns.subcommand == "submit":
        payload = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
        assert payload, f"{source}: `convllava submit` without a command to run"
        parsed += _parse(payload, source)
    return parsed


def _subcommands() -> set[str]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_the_commands_that_matter_were_found():
    """Guards the extraction itself: the entry points of every way to run the pipeline are among COMMANDS."""
    found = {(src.split("[")[0].split(" ")[0], " ".join(a for a in argv[1:3] if not a.startswith("-")))
             for src, argv in COMMANDS}  # fmt: skip
    assert {
        ("infra/kuberay/rayjob.yaml", "pipeline run"),
        ("infra/kuberay/raycronjob.yaml", "retrain"),
        ("infra/kuberay/cronjob-rayjob.yaml", "retrain"),
        ("infra/kuberay/raycluster.yaml", "submit"),
        ("infra/ray-cluster-launcher/aws.yaml", "submit"),
        ("infra/docker/Dockerfile", "info"),
        ("infra/README.md", "pipeline run"),
    } <= found


@pytest.mark.parametrize("source, argv", COMMANDS, ids=COMMAND_IDS)
def test_command_is_accepted_by_the_cli(source, argv):
    assert argv[0] == "convllava"
    _parse(argv[1:], source)


@pytest.mark.parametrize("source, argv", COMMANDS, ids=COMMAND_IDS)
def test_config_files_named_by_commands_exist(source, argv):
    """Paths are relative to the repository root: the image's working directory is a copy of it."""
    for ns in _parse(argv[1:], source):
        config = getattr(ns, "config", None)
        if config is not None:
            assert (ROOT / config).is_file(), f"{source}: `--config {config}` is not a file in the repository"


def test_prose_mentions_name_real_subcommands():
    subcommands = _subcommands()
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        for mention in _PROSE_MENTION.findall(path.read_text()):
            assert mention.split()[0] in subcommands, f"{path.relative_to(ROOT)}: `convllava {mention}`"


# -------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in INFRA.rglob("*") if p.is_file()
                                        and p.name != "README.md"))  # fmt: skip
def test_every_file_starts_with_the_command_that_uses_it(path):
    first = (ROOT / path).read_text().splitlines()[0]
    own = "infra/docker/Dockerfile" if path.endswith(".dockerignore") else path
    assert first.startswith("# ") and any(c in first for c in ("kubectl ", "ray up ", "docker build ")), first
    assert own in first, f"{path}: the first line should name the file it applies: {first}"


@pytest.mark.parametrize("source, doc", K8S_DOCS, ids=[s for s, _ in K8S_DOCS])
def test_kubernetes_objects_are_well_formed(source, doc):
    kind = doc.get("kind")
    assert kind in API_VERSIONS, f"{source}: unexpected kind {kind!r}"
    assert doc.get("apiVersion") == API_VERSIONS[kind], f"{source}: {kind} needs apiVersion {API_VERSIONS[kind]}"
    meta = doc.get("metadata") or {}
    assert meta.get("name") or meta.get("generateName"), f"{source}: no metadata.name"
    embedded = ":" in source  # a ConfigMap's RayJob is created in the namespace of the pod that creates it
    assert kind == "Namespace" or embedded or meta.get("namespace") in {"convllava", "mlflow"}, source


def test_no_secret_objects_and_no_inline_credentials():
    assert not [src for src, d in DOCS if d.get("kind") == "Secret"], "Secrets are created by hand, not committed"
    # Whole name parts only: TOKENIZERS_PARALLELISM is no token.
    secret_word = r"(?<![A-Za-z])(?:PASSWORD|SECRET|TOKEN|CREDENTIALS?|PRIVATE|ACCESS_KEY)(?![A-Za-z])"
    secret_name = re.compile(secret_word, re.I)
    looks_secret = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
    for src, doc in DOCS:
        for container in _containers(doc):
            for env in container.get("env", []):
                where = f"{src}: container {container['name']} env {env['name']}"
                if secret_name.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where} must come from a secretKeyRef"
                if "value" in env:
                    assert not looks_secret.search(str(env["value"])), f"{where} has a credential-like value"
                    assert not re.search(r"://[^/\s:@]+:[^@\s/]+@", str(env["value"])), f"{where}: password in a URL"
    # Anywhere in the files: no access key ids, no password in a URL or assignment unless it is a $VARIABLE.
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not re.search(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path}: AWS access key id"
        for password in re.findall(r"://[^/\s:@'\"]+:([^@\s/'\"]+)@", text):
            assert password.startswith("$"), f"{path}: literal password in a URL"
        for key, value in re.findall(rf"(?i)([\w-]*{secret_word}[\w-]*)[\"']?\s*[:=]\s*[\"']?([^\s\"'}}]+)", text):
            assert value.startswith("$") or value in {"", "|", "{", "["}, f"{path}: {key} = {value!r} inline"


def test_secrets_referenced_have_creation_instructions():
    """Every Secret a pod reads is one the docs say how to create (`kubectl ... create secret generic NAME`)."""
    # A RayJob embedded in a ConfigMap has no namespace of its own: it is created in convllava.
    referenced = {(doc["metadata"].get("namespace", "convllava"), ref["name"])
                  for _, doc in DOCS for node in _walk(doc) if isinstance(node, dict)
                  for ref in [node.get("secretRef") or node.get("secretKeyRef")] if ref}  # fmt: skip
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    created = set(re.findall(r"kubectl -n (\S+) create secret generic (\S+)", text))
    assert referenced and referenced <= created, f"no creation instructions for {sorted(referenced - created)}"


# ------------------------------------------------------------------------------------------- Ray on k8s


def test_image_is_one_tag_everywhere_and_follows_the_project_version():
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    assert set(re.findall(r"ghcr\.io/convllava/convllava:[\w.-]+", text)) == {IMAGE}
    ray_crs = [RAYCLUSTER, RAYJOB, RAYCRONJOB, SCHEDULED_RAYJOB, CRONJOB]
    assert {c["image"] for doc in ray_crs for c in _containers(doc)} == {IMAGE}
    assert yaml.safe_load(LAUNCHER.read_text())["docker"]["image"] == IMAGE
    for src, doc in K8S_DOCS:
        for c in _containers(doc):
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
    assert gpu_container["resources"]["requests"]["nvidia.com/gpu"] == gpu_container["resources"]["limits"][
        "nvidia.com/gpu"] == 8  # fmt: skip
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
    pvc = _one("PersistentVolumeClaim", "convllava-work")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # head and every worker mount it at once


@pytest.mark.parametrize("where, spec", RAYJOB_SPECS, ids=[w for w, _ in RAYJOB_SPECS])
def test_rayjob_entrypoints(where, spec):
    (argv,) = _commands_in(spec["entrypoint"])
    (ns, *_) = _parse(argv[1:], where)
    assert (ns.subcommand, getattr(ns, "action", None)) == (("pipeline", "run") if where == "rayjob.yaml" else
                                                            ("retrain", None))  # fmt: skip
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
        for c in _containers(spec["rayClusterSpec"]):
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
    assert SCHEDULED_RAYJOB["spec"]["activeDeadlineSeconds"] <= job["activeDeadlineSeconds"] <= _period_s(
        spec["schedule"])  # fmt: skip
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["command"] == ["python", f"{mount}/schedule.py"]
    assert f'"{mount}/rayjob.yaml"' in SCHEDULER_CONFIGMAP["data"]["schedule.py"]
    # RBAC: the pod's ServiceAccount may create, get and list RayJobs in its namespace, nothing else.
    role = _one("Role", "convllava-retrain-scheduler")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    binding = _one("RoleBinding", "convllava-retrain-scheduler")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": CRONJOB["metadata"]["namespace"]}]  # fmt: skip
    assert SCHEDULED_RAYJOB["metadata"]["generateName"] and "name" not in SCHEDULED_RAYJOB["metadata"]


def test_raycronjob_uses_only_fields_kuberay_defines():
    """KubeRay's RayCronJobSpec is schedule, jobTemplate, suspend and (1.7.0+) timeZone, with no concurrencyPolicy:
    an unknown field fails `kubectl apply`. Overlap is prevented by a RayJob deadline shorter than the period."""
    spec = RAYCRONJOB["spec"]
    assert set(spec) <= {"schedule", "jobTemplate", "suspend", "timeZone"}
    assert "concurrencyPolicy" not in spec
    assert spec["jobTemplate"]["activeDeadlineSeconds"] < _period_s(spec["schedule"])
    assert len(RAYCRONJOB["metadata"]["name"]) <= 36  # KubeRay appends -<minutes> and caps RayJob names at 47


# ----------------------------------------------------------------------------------------------- MLflow


def test_tracking_uri_is_the_mlflow_service():
    url = urlsplit(TRACKING_URI)
    name, namespace = url.hostname.split(".")[:2]
    service = _one("Service", name, source="infra/mlflow/")
    assert service["metadata"]["namespace"] == namespace
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    deployment = _one("Deployment", "mlflow")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_server_options_parse_with_the_pinned_mlflow(monkeypatch):
    from mlflow.cli import server
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header

    deployment = _one("Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{PINS['mlflow']}-full"
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert container["command"] == ["mlflow", "server"]
    # Kubernetes expands $(VAR) from the container's env; stand in a URI of the same form.
    args = [a.replace("$(MLFLOW_BACKEND_STORE_URI)", "postgresql://mlflow:pw@postgres.mlflow.svc:5432/mlflow")
            for a in container["args"]]  # fmt: skip
    assert "$(MLFLOW_BACKEND_STORE_URI)" in container["args"]
    params = server.make_context("server", args).params
    assert params["backend_store_uri"].startswith("postgresql://")
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"] is True
    assert (params["host"], params["port"]) == ("0.0.0.0", 5000)
    # The server checks Host headers the way MLflow does; pods use the Service name, port-forwards localhost.
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", params["allowed_hosts"])
    allowed = get_allowed_hosts_from_env()
    assert is_allowed_host_header(allowed, urlsplit(TRACKING_URI).netloc)
    assert is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"


def test_postgres_keeps_its_data_and_password_out_of_the_manifest():
    postgres = _one("StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]


# ------------------------------------------------------------------------------ cluster launcher, image


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
    submits = [ns for src, argv in COMMANDS if src.startswith("infra/ray-cluster-launcher/")
               for ns in _parse(argv[1:], src)[1:]]  # fmt: skip
    assert submits and all((ns.subcommand, ns.action, ns.workdir) == ("pipeline", "run", "/mnt/work") for ns in submits)
    assert "convllava submit --address http://HEAD:8265 -- pipeline run --config jobs/configs/cluster.yaml" in text


def test_dockerfile_installs_in_the_makefiles_order():
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    runs = [line for line in lines if line.startswith("RUN ")]

    def index(*needles: str) -> int:
        (i,) = [i for i, line in enumerate(runs) if all(n in line for n in needles)]
        return i

    torch = index(f"torch=={PINS['torch']}", f"torchvision=={PINS['torchvision']}")
    deepspeed = index(f"deepspeed=={PINS['deepspeed']}", "DS_BUILD_OPS=0", "DS_BUILD_SHM_COMM=1", "--no-cache-dir",
                      "--no-build-isolation")  # fmt: skip
    project = index("pip install", "'.[gpu]'")
    assert torch < deepspeed < project
    assert (PINS["torch"], PINS["torchvision"], PINS["deepspeed"]) == ("2.14.1", "0.29.1", "0.19.8")
    env = " ".join(line for line in lines if line.startswith("ENV "))
    assert "HF_HUB_OFFLINE=1" in env
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {".git", ".venv", "work"} <= set(ignored)
    assert not [p for p in ignored if p.startswith(("jobs", "convllava", "pipelines", "pyproject"))]


# ------------------------------------------------------------------------- the CronJob's scheduler script


@pytest.fixture()
def fake_kubernetes():
    """An HTTP stand-in for the API server's rayjobs endpoints, recording every request."""
    state = {"items": [], "statuses": [], "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, body: dict, code: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            state["requests"].append(("GET", self.path, self.headers["Authorization"], None))
            if "?" in self.path:
                self._reply({"items": state["items"]})
            elif state["statuses"]:
                self._reply({"metadata": {"name": self.path.rsplit("/", 1)[1]}, "status": state["statuses"].pop(0)})
            else:  # nothing more scripted: the RayJob is gone, which ends the scheduler's wait
                self._reply({"kind": "Status", "code": 404}, 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(("POST", self.path, self.headers["Authorization"], body))
            self._reply({**body, "metadata": {**body["metadata"], "name": "convllava-retrain-x7k2p"}}, 201)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


def _run_scheduler(tmp_path: Path, api: str) -> subprocess.CompletedProcess:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "namespace").write_text("convllava\n")
    (sa / "token").write_text("t0k3n\n")
    for key in ("schedule.py", "rayjob.yaml"):
        (tmp_path / key).write_text(SCHEDULER_CONFIGMAP["data"][key])
    env = {**os.environ, "SERVICEACCOUNT_DIR": str(sa), "KUBERNETES_API": api, "POLL_SECONDS": "0",
           "RAYJOB_TEMPLATE": str(tmp_path / "rayjob.yaml")}  # fmt: skip
    return subprocess.run([sys.executable, str(tmp_path / "schedule.py")], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def _rayjob(name: str, deployment_status: str | None) -> dict:
    status = {} if deployment_status is None else {"jobDeploymentStatus": deployment_status}
    return {"metadata": {"name": name}, "status": status}


def test_scheduler_creates_the_rayjob_and_waits_until_it_succeeds(tmp_path, fake_kubernetes):
    api, state = fake_kubernetes
    state["items"] = [_rayjob("convllava-retrain-old1", "Complete"), _rayjob("convllava-retrain-old2", "Failed")]
    state["statuses"] = [{}, {"jobDeploymentStatus": "Initializing"},
                         {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                         {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]  # fmt: skip
    result = _run_scheduler(tmp_path, api)
    assert result.returncode == 0, result.stdout + result.stderr
    methods = [r[0] for r in state["requests"]]
    assert methods == ["GET", "POST", "GET", "GET", "GET", "GET"]  # list, create, four polls until Complete
    collection = "/apis/ray.io/v1/namespaces/convllava/rayjobs"
    listing, create = state["requests"][:2]
    assert listing[1].startswith(collection + "?")
    assert parse_qs(urlsplit(listing[1]).query)["labelSelector"] == [
        "app.kubernetes.io/component=retrain,app.kubernetes.io/name=convllava"]  # fmt: skip
    assert create[1] == collection and create[3] == SCHEDULED_RAYJOB  # the ConfigMap's RayJob, unchanged
    assert {r[2] for r in state["requests"]} == {"Bearer t0k3n"}
    assert all(r[1] == f"{collection}/convllava-retrain-x7k2p" for r in state["requests"][2:])
    assert "created rayjob/convllava-retrain-x7k2p" in result.stdout


def test_scheduler_fails_when_the_ray_job_fails(tmp_path, fake_kubernetes):
    api, state = fake_kubernetes
    state["statuses"] = [{"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}]
    result = _run_scheduler(tmp_path, api)
    assert result.returncode == 1
    assert "Complete, Ray job FAILED" in result.stdout


@pytest.mark.parametrize("active_status", [None, "Initializing", "Running", "Suspended"])
def test_scheduler_skips_the_tick_while_a_retraining_rayjob_is_active(tmp_path, fake_kubernetes, active_status):
    api, state = fake_kubernetes
    state["items"] = [_rayjob("convllava-retrain-old", "Complete"), _rayjob("convllava-retrain-busy", active_status)]
    result = _run_scheduler(tmp_path, api)
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in state["requests"]] == ["GET"]  # listed, nothing created
    assert "skipped" in result.stdout and "convllava-retrain-busy" in result.stdout
