"""The DAG's record in MLflow: one parent run per execution, one child run per node, found again by tags.

Every search the DAG, `pipeline status` and `retrain` make goes through `find_runs`, so the filter syntax
(backquoted tag names, quoted values) is written in one place.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from jobs.tracking.runs import client, log_params
from jobs.tracking.vocabulary import (
    ARTIFACT_PIPELINE_CONFIG,
    TAG_CODE_VERSION,
    TAG_NODE,
    TAG_NODE_KEY,
    TAG_OUTPUT,
    TAG_PARENT_RUN,
    TAG_PIPELINE,
    TAG_PIPELINE_KEY,
    TAG_REUSED,
    TAG_SKIPPED,
    TRAIN_LOSS,
    WRITTEN,
    eval_metric,
)


@dataclass
class NodeOutcome:
    """How a node ended in this execution: `ran`, `skipped` (reused from an earlier execution) or `done` (finished
    earlier in this same, resumed execution)."""

    node: str
    status: str
    seconds: float
    output: str
    run_id: str
    metric: tuple[str, float] | None = None


def _quoted(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def find_runs(
    client,
    experiment_id: str,
    tags: dict[str, str] | None = None,
    status: str | None = None,
    newest_first: str | None = None,
    max_results: int = 1000,
    tag_set: tuple[str, ...] = (),
) -> list:
    """Runs of `experiment_id` whose tags equal `tags`, with `status` (FINISHED, ...) when given, and a non-empty
    value for each tag in `tag_set`. `newest_first`: `start_time` or `end_time` to order by."""
    terms = [f"tags.`{k}` = {_quoted(v)}" for k, v in (tags or {}).items()]
    terms += [f"tags.`{k}` != ''" for k in tag_set]
    if status is not None:
        terms.append(f"attributes.status = {_quoted(status)}")
    order = [f"attributes.{newest_first} DESC"] if newest_first else None
    return client.search_runs(
        [experiment_id], filter_string=" and ".join(terms), order_by=order, max_results=max_results
    )


def key_metric(node: str, metrics: dict[str, float], primary: str = "") -> tuple[str, float] | None:
    """The figure a node is summarised by: final loss for stages, the primary metric for eval, rows written."""
    wanted = eval_metric(primary) if node == "eval" else TRAIN_LOSS
    if wanted in metrics:
        return wanted, metrics[wanted]
    written = written_rows(metrics)
    return (WRITTEN, written) if node == "preprocess" and written else None


def written_rows(metrics: dict[str, float]) -> float:
    """Rows preprocessing wrote over every data set, from its `<data set>/written` metrics."""
    return sum(v for k, v in metrics.items() if k.endswith(f"/{WRITTEN}"))


class RunBook:
    """Creates, finds, reuses and closes the runs of one pipeline (by name) in one experiment."""

    def __init__(self, tracking_uri: str, experiment_id: str, pipeline: str, primary_metric: str) -> None:
        self.tracking_uri, self.client, self.experiment_id = tracking_uri, client(tracking_uri), experiment_id
        self.pipeline, self.primary_metric = pipeline, primary_metric

    def _find(self, **kwargs: Any) -> list:
        return find_runs(self.client, self.experiment_id, **kwargs)

    def parent_run(self, key: str, fresh: bool, params: dict[str, Any], code_version: str) -> str:
        """The execution's parent run: the interrupted one with this key when there is one (and not `fresh`)."""
        if not fresh:
            runs = self._find(
                tags={TAG_PIPELINE: self.pipeline, TAG_PIPELINE_KEY: key}, newest_first="start_time", max_results=1
            )
            if runs and runs[0].info.status != "FINISHED":
                self.client.update_run(runs[0].info.run_id, status="RUNNING")
                return runs[0].info.run_id
        tags = {TAG_PIPELINE: self.pipeline, TAG_PIPELINE_KEY: key, TAG_CODE_VERSION: code_version}
        run_id = self.client.create_run(self.experiment_id, run_name=self.pipeline, tags=tags).info.run_id
        log_params(self.tracking_uri, run_id, params)
        self.client.log_text(run_id, json.dumps(params, indent=2), ARTIFACT_PIPELINE_CONFIG)
        return run_id

    def child_run(self, parent: str, node: str, node_key: str, tags: dict[str, str]) -> str:
        """The node's run under `parent`: the one a resumed execution already made, else a new one."""
        runs = self._find(tags={TAG_PARENT_RUN: parent, TAG_NODE: node, TAG_NODE_KEY: node_key}, max_results=1)
        if runs:
            self.client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
        all_tags = {
            TAG_PARENT_RUN: parent,
            TAG_PIPELINE: self.pipeline,
            TAG_NODE: node,
            TAG_NODE_KEY: node_key,
            TAG_SKIPPED: "false",
            **tags,
        }
        return self.client.create_run(self.experiment_id, run_name=node, tags=all_tags).info.run_id

    def reuse(self, parent: str, node: str, node_key: str, tags: dict[str, str], valid) -> NodeOutcome | None:
        """The node's recorded outcome when it need not run: finished earlier in this execution (a resumed one),
        or in any earlier execution with the same key (then recorded here as skipped)."""
        own = self._find(
            tags={TAG_PARENT_RUN: parent, TAG_NODE: node, TAG_NODE_KEY: node_key}, status="FINISHED", max_results=1
        )
        if own and valid(own[0].data.tags.get(TAG_OUTPUT, "")):
            run = own[0]
            metric = key_metric(node, run.data.metrics, self.primary_metric)
            return NodeOutcome(node, "done", 0.0, run.data.tags.get(TAG_OUTPUT, ""), run.info.run_id, metric)
        earlier = self._find(tags={TAG_NODE_KEY: node_key, TAG_SKIPPED: "false"}, status="FINISHED", max_results=1)
        if earlier and valid(earlier[0].data.tags.get(TAG_OUTPUT, "")):
            return self._record_skip(parent, node, node_key, earlier[0], tags)
        return None

    def _record_skip(self, parent: str, node: str, node_key: str, previous, tags: dict[str, str]) -> NodeOutcome:
        run_id = self.child_run(parent, node, node_key, {**tags, TAG_REUSED: previous.info.run_id})
        output = previous.data.tags.get(TAG_OUTPUT, "")
        self.client.set_tag(run_id, TAG_SKIPPED, "true")
        self.client.set_tag(run_id, TAG_OUTPUT, output)
        self.client.set_terminated(run_id, "FINISHED")
        metric = key_metric(node, previous.data.metrics, self.primary_metric)
        return NodeOutcome(node, "skipped", 0.0, output, run_id, metric)

    def source_tags(self, run_id: str) -> dict[str, str]:
        """The tags of the run that did the work: the reused run's for a skipped node."""
        tags = self.client.get_run(run_id).data.tags
        return self.client.get_run(tags[TAG_REUSED]).data.tags if TAG_REUSED in tags else tags

    def finish(self, run_id: str, metrics: dict[str, float], output: str) -> None:
        from mlflow.entities import Metric

        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self.client.set_tag(run_id, TAG_OUTPUT, output)
        self.client.set_terminated(run_id, "FINISHED")

    def latest_execution(self):
        """The newest parent run of this pipeline, or None."""
        runs = self._find(
            tags={TAG_PIPELINE: self.pipeline}, tag_set=(TAG_PIPELINE_KEY,), newest_first="start_time", max_results=5
        )
        return next((r for r in runs if TAG_NODE not in r.data.tags), None)

    def last_success(self, tag: str):
        """The newest finished parent run carrying a non-empty `tag`, or None."""
        runs = self._find(
            tags={TAG_PIPELINE: self.pipeline},
            tag_set=(tag,),
            status="FINISHED",
            newest_first="end_time",
            max_results=20,
        )
        return next((r for r in runs if TAG_NODE not in r.data.tags), None)

    def children(self, parent: str) -> dict[str, Any]:
        return {r.data.tags.get(TAG_NODE): r for r in self._find(tags={TAG_PARENT_RUN: parent})}
