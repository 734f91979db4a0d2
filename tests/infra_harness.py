"""The deployable manifests under infra/, loaded once for the infra tests: every YAML document, the objects the
checks compare, and every `convllava` command line found in the manifests, the Dockerfile and infra/README.md."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
LAUNCHER = INFRA / "ray-cluster-launcher" / "aws.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINS = dict(
    re.match(r"([A-Za-z0-9_-]+)(?:\[[^\]]*\])?==(\S+)", d).groups()
    for d in PYPROJECT["project"]["dependencies"]
    if "==" in d
)
IMAGE = f"ghcr.io/convllava/convllava:{PYPROJECT['project']['version']}"


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


def one_doc(kind: str, name: str | None = None, source: str | None = None) -> dict:
    """The one Kubernetes object of `kind` (by name or generateName, in files whose path contains `source`)."""
    found = [
        d
        for src, d in K8S_DOCS
        if d.get("kind") == kind
        and (source is None or source in src)
        and (name is None or name in (d["metadata"].get("name"), d["metadata"].get("generateName")))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in infra/{source or ''}, found {len(found)}"
    return found[0]


def walk(node) -> Iterator:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def string_values(node) -> Iterator[str]:
    """Every string value; a ConfigMap's files are skipped (its YAML files are documents of their own in DOCS)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict) and node.get("kind") != "ConfigMap":
        for value in node.values():
            yield from string_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from string_values(value)


def containers(doc: dict) -> list[dict]:
    return [
        c
        for node in walk(doc)
        if isinstance(node, dict)
        for key in ("containers", "initContainers")
        for c in node.get(key) or []
    ]


RAYCLUSTER = one_doc("RayCluster")
RAYJOB = one_doc("RayJob", "convllava-pipeline-")
RAYCRONJOB = one_doc("RayCronJob")
CRONJOB = one_doc("CronJob")
SCHEDULER_CONFIGMAP = one_doc(
    "ConfigMap", CRONJOB["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
)
SCHEDULED_RAYJOB = yaml.safe_load(SCHEDULER_CONFIGMAP["data"]["rayjob.yaml"])
# (where, RayJob spec) of every RayJob the manifests create, by hand or on a schedule
RAYJOB_SPECS = [
    ("rayjob.yaml", RAYJOB["spec"]),
    ("raycronjob.yaml", RAYCRONJOB["spec"]["jobTemplate"]),
    ("cronjob-rayjob.yaml", SCHEDULED_RAYJOB["spec"]),
]
TRACKING_URI = RAYCLUSTER["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["value"]


# ------------------------------------------------------------------------------- convllava command lines

_SEGMENT_SPLIT = re.compile(r"\s*(?:&&|\|\||;|\|)\s*")
_ENV_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+")


def commands_in(text: str) -> list[list[str]]:
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
        commands += [(f"{rel} (comment)", argv) for argv in commands_in(_comment_text(path.read_text()))]
    for src, doc in DOCS:
        commands += [(src, argv) for text in string_values(doc) for argv in commands_in(text)]
        for container in containers(doc):
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv[:1] == ["convllava"]:
                commands.append((f"{src} container {container['name']}", argv))
    dockerfile = DOCKERFILE.read_text()
    commands += [("infra/docker/Dockerfile (comment)", argv) for argv in commands_in(_comment_text(dockerfile))]
    for line in dockerfile.replace("\\\n", " ").splitlines():
        if line.startswith("RUN "):
            commands += [("infra/docker/Dockerfile RUN", argv) for argv in commands_in(line[4:])]
        if line.startswith("CMD "):
            commands.append(("infra/docker/Dockerfile CMD", json.loads(line[4:])))
    readme = (INFRA / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, flags=re.S):
        commands += [("infra/README.md", argv) for argv in commands_in(block)]
    return commands


COMMANDS = _collect_commands()
COMMAND_IDS = [f"{src}: {shlex.join(argv)}"[:110] for src, argv in COMMANDS]


def parse_command(args: list[str], source: str) -> list[argparse.Namespace]:
    """Parse as `convllava` does; a `submit` command's payload is a convllava command itself and is parsed too."""
    try:
        ns = build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{source}: the CLI refuses `convllava {shlex.join(args)}` (exit {e.code}; see stderr)")
    parsed = [ns]
    if ns.subcommand == "submit":
        payload = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
        assert payload, f"{source}: `convllava submit` without a command to run"
        parsed += parse_command(payload, source)
    return parsed
