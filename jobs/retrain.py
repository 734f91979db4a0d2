"""`convllava retrain`: scheduled retraining that only retrains when the raw data changed.

The raw-data fingerprint covers every annotation record and every image's fingerprint (S3 ETag, or size +
mtime of local files) of every data set. When it equals the one recorded by the last successful pipeline
execution in MLflow, retrain exits as a no-op and says so. Otherwise it runs the pipeline: preprocessing is
incremental (only new or changed samples are processed), the stages re-run on the new shards, and with
`init_from_champion: true` stage 1 starts from the current champion. Two retrains fired on the same schedule
tick queue on the work dir's lock; the second then finds nothing changed and exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.pipeline import TAG_PIPELINE, Pipeline, _summary, raw_fingerprint, workdir_lock
from jobs.pipeline_config import PipelineConfig
from jobs.progress import Progress
from jobs.tracking import client, default_tracking_uri


@dataclass
class RetrainOutcome:
    ok: bool
    ran: bool
    message: str
    fingerprint: str


def last_success_fingerprint(tracking_uri: str, config: PipelineConfig) -> tuple[str, str] | None:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(config.name)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{TAG_PIPELINE}` = '{config.name}' and attributes.status = 'FINISHED' "
        "and tags.`convllava.raw_fingerprint` != ''"), order_by=["attributes.end_time DESC"], max_results=20)  # fmt: skip
    for r in runs:
        if "convllava.node" not in r.data.tags:
            return r.data.tags["convllava.raw_fingerprint"], r.info.run_id
    return None


def run_retrain(
    config_path: str,
    workdir: str = "work/pipeline",
    tracking_uri: str | None = None,
    address: str | None = None,
    lock_timeout_s: float = 24 * 3600,
    progress: Progress | None = None,
) -> RetrainOutcome:
    config = PipelineConfig.from_yaml(config_path)
    wd = Path(workdir).resolve()
    tracking_uri = tracking_uri or default_tracking_uri(wd)
    with workdir_lock(wd, wait_s=lock_timeout_s):
        pipeline = Pipeline(config, wd, tracking_uri, address, progress)
        pipeline.ensure_demo_data()
        fingerprint = raw_fingerprint(config, pipeline.data_root)
        last = last_success_fingerprint(tracking_uri, config)
        if last is not None and last[0] == fingerprint:
            return RetrainOutcome(True, False, f"retrain: no-op: the raw data is unchanged since the last successful "
                                  f"pipeline run {last[1]} (fingerprint {fingerprint[:16]})", fingerprint)  # fmt: skip
        why = "no successful pipeline run yet" if last is None else f"raw data changed since run {last[1]}"
        result = pipeline.run(from_node=None)  # nodes whose inputs did not change are reused, the rest re-run
    message = f"retrain: ran the pipeline ({why}), fingerprint {fingerprint[:16]}\n{_summary(result, tracking_uri)}"
    return RetrainOutcome(result.ok, True, message, fingerprint)
