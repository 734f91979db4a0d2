"""Every file under infra/ names the command that uses it, every Kubernetes object is well formed, and
secrets are referenced only, never committed, each with instructions to create it."""

from __future__ import annotations

import re

import pytest
from infra_harness import DOCS, INFRA, K8S_DOCS, ROOT, containers, walk

API_VERSIONS = {
    "Namespace": "v1",
    "PersistentVolumeClaim": "v1",
    "ServiceAccount": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "CronJob": "batch/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "RayCronJob": "ray.io/v1",
}


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(ROOT).as_posix() for p in INFRA.rglob("*") if p.is_file() and p.name != "README.md")
)
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
        for container in containers(doc):
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
    referenced = {
        (doc["metadata"].get("namespace", "convllava"), ref["name"])
        for _, doc in DOCS
        for node in walk(doc)
        if isinstance(node, dict)
        for ref in [node.get("secretRef") or node.get("secretKeyRef")]
        if ref
    }
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    created = set(re.findall(r"kubectl -n (\S+) create secret generic (\S+)", text))
    assert referenced and referenced <= created, f"no creation instructions for {sorted(referenced - created)}"
