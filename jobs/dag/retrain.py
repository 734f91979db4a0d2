"""`convllava retrain`: scheduled retraining that only retrains when the raw data changed.

The raw-data fingerprint covers every annotation record and every image's fingerprint (size + modification
time, local or S3) of every data set. When it equals the one recorded by the last successful pipeline
execution in MLflow, retrain exits as a no-op and says so. Otherwise it runs the pipeline: preprocessing is
incremental (only new or changed samples are processed), the stages re-run on the new shards, and with
`init_from_champion: true` the first stage starts from the current champion. Two retrains fired on the same schedule
tick queue on the work dir's lock; the second then finds nothing changed and exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.dag.config import PipelineConfig
from jobs.dag.report import summary
from jobs.dag.runner import TrainingDag, raw_fingerprint, workdir_lock
from jobs.progress import Progress
from jobs.tracking.runs import default_tracking_uri
from jobs.tracking.vocabulary import TAG_RAW_FINGERPRINT


@dataclass
class RetrainOutcome:
    ok: bool
    ran: bool
    message: str
    fingerprint: str


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
        dag = TrainingDag(config, wd, tracking_uri, address, progress)
        dag.ensure_demo_data()
        fingerprint = raw_fingerprint(dag)
        last = dag.runs.last_success(TAG_RAW_FINGERPRINT)
        if last is not None and last.data.tags[TAG_RAW_FINGERPRINT] == fingerprint:
            return RetrainOutcome(
                True,
                False,
                f"retrain: no-op: the raw data is unchanged since the last successful pipeline run "
                f"{last.info.run_id} (fingerprint {fingerprint[:16]})",
                fingerprint,
            )
        why = "no successful pipeline run yet" if last is None else f"raw data changed since run {last.info.run_id}"
        result = dag.run(from_node=None)  # nodes whose inputs did not change are reused, the rest re-run
    message = f"retrain: ran the pipeline ({why}), fingerprint {fingerprint[:16]}\n{summary(result, tracking_uri)}"
    return RetrainOutcome(result.ok, True, message, fingerprint)
