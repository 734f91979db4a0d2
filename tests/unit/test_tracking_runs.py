"""Where a local MLflow store keeps its artifacts."""

from __future__ import annotations

from jobs.tracking.runs import artifact_root, client, start_run


def test_a_sqlite_stores_artifacts_land_beside_it_not_in_the_current_directory(tmp_path, monkeypatch):
    """`convllava train` creates its experiment itself: without an explicit location MLflow would put the run's
    artifacts in ./mlruns of wherever the command was started."""
    (tmp_path / "wd").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    uri = f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}"
    run_id = start_run(uri, "convllava", "stage1")
    client(uri).log_text(run_id, "plan", "plan.txt")
    (stored,) = (tmp_path / "wd" / "mlartifacts").rglob("plan.txt")
    assert stored.read_text() == "plan" and not (tmp_path / "elsewhere" / "mlruns").exists()
    assert artifact_root(uri) == str(tmp_path / "wd" / "mlartifacts")
    assert artifact_root("http://127.0.0.1:5000") is None  # a server decides its own
