"""The MLflow tracking server: reachable at the address the Ray pods use, its options parsed by the pinned
MLflow, its Postgres backend keeping data and password out of the manifest."""

from __future__ import annotations

from urllib.parse import urlsplit

from infra_harness import PINS, TRACKING_URI, one_doc


def test_tracking_uri_is_the_mlflow_service():
    url = urlsplit(TRACKING_URI)
    name, namespace = url.hostname.split(".")[:2]
    service = one_doc("Service", name, source="infra/mlflow/")
    assert service["metadata"]["namespace"] == namespace
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    deployment = one_doc("Deployment", "mlflow")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_server_options_parse_with_the_pinned_mlflow(monkeypatch):
    from mlflow.cli import server
    from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header

    deployment = one_doc("Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{PINS['mlflow']}-full"
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert container["command"] == ["mlflow", "server"]
    # Kubernetes expands $(VAR) from the container's env; stand in a URI of the same form.
    args = [
        a.replace("$(MLFLOW_BACKEND_STORE_URI)", "postgresql://mlflow:pw@postgres.mlflow.svc:5432/mlflow")
        for a in container["args"]
    ]
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
    postgres = one_doc("StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
