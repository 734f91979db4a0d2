"""Every name jobs/ writes to or reads from MLflow: run, node and registry tags, metric names, artifact paths.

A tag, metric or artifact is spelled here once; the code that writes it and the code that reads it back (the DAG's
reuse, `pipeline status`, `retrain`, the registry's gate) import the same constant. The values are what users see in
the MLflow UI and search with (tags.`convllava.node` = 'stage1'): renaming one orphans every recorded run.
"""

from __future__ import annotations

# --- MLflow's own names ---------------------------------------------------------------------------------------------

TAG_PARENT_RUN = "mlflow.parentRunId"  # a child run's parent: a node run's pipeline run
TAG_NOTE = "mlflow.note.content"  # a run's description in the UI (markdown): the pipeline's table, the eval report
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # experiment tag: which view MLflow 3's UI opens the experiment in
EXPERIMENT_KIND = "custom_model_development"  # ... ours: model training (the runs table), not GenAI
DATASET_CONTEXT_TAG = "mlflow.data.context"  # a dataset input's role: `raw`, `training`, `evaluation`

# --- run names --------------------------------------------------------------------------------------------------

DEFAULT_EXPERIMENT = "convllava"  # the experiment `convllava train` logs a stage into (a pipeline uses its name)


def stage_run_name(node: str, node_key: str, parent_run_id: str) -> str:
    """A pipeline stage's Ray Train run name (its checkpoint folder under the storage): the same name resumes, so it
    carries the node, its key and the execution (parent run)."""
    return f"{node}-{node_key[:10]}-{parent_run_id[:8]}"


# --- pipeline (parent) run tags -------------------------------------------------------------------------------------

TAG_PIPELINE = "convllava.pipeline"  # the pipeline's name, on its parent run and on every node run
TAG_PIPELINE_KEY = "convllava.pipeline_key"  # the resolved pipeline config's hash: finds an interrupted execution
TAG_CODE_VERSION = "convllava.code_version"  # the code that ran the execution (package version, git commit)
TAG_RAW_FINGERPRINT = "convllava.raw_fingerprint"  # one hash over every data set's raw input: what `retrain` compares
TAG_GATE = "convllava.gate"  # the champion gate's decision as JSON, on the parent run and the eval run

# --- node run tags ----------------------------------------------------------------------------------------------

TAG_NODE = "convllava.node"  # the node's name (preprocess, a stage's name, eval)
TAG_NODE_KEY = "convllava.node_key"  # hash of the node's resolved config and inputs: equal keys reuse the output
TAG_OUTPUT = "convllava.output_uri"  # what the node produced: shard URIs, a model URI, the eval output folder
TAG_SKIPPED = "convllava.skipped"  # "true" when the node reused an earlier execution's output, else "false"
TAG_REUSED = "convllava.reused_run_id"  # on a skipped node: the run whose output it reused
TAG_STAGE = "convllava.stage"  # a stage run's stage number (1, 2, 3)
TAG_CONFIG_HASH = "convllava.config_hash"  # hash of the node's resolved config (a stage's, preprocess's output)
TAG_INPUT_FINGERPRINT = "convllava.input_fingerprint"  # fingerprint of the raw data the node consumes
TAG_PARENT_CHECKPOINT = "convllava.parent_checkpoint"  # the checkpoint a stage starts from / eval evaluates
TAG_CHECKPOINT_URI = "convllava.checkpoint_uri"  # the verified checkpoint: on a stage run and a registered version
TAG_GATE_DECISION = "convllava.gate_decision"  # on the eval run: "promoted" or "kept the current champion"
TAG_RESIZE_PREFIX = "convllava.resize.step_"  # + step: an elastic stage resumed at another world size


def resize_tag(step: int) -> str:
    """The tag recording an elastic resize at `step` (`convllava.resize.step_000120`: sorted by step in the UI)."""
    return f"{TAG_RESIZE_PREFIX}{step:06d}"


# --- registry (model version) tags and aliases ----------------------------------------------------------------------

TAG_PRIMARY_METRIC = "convllava.primary_metric"  # the metric the gate compared
TAG_PRIMARY_METRIC_VALUE = "convllava.primary_metric_value"  # its value for this version (repr of a float)
TAG_GATE_PREFIX = "convllava.gate."  # + a gate field (decision, champion_version, ...): the gate on the version
ALIAS_CANDIDATE = "candidate"  # the newest evaluated version
ALIAS_CHAMPION = "champion"  # the version that won the gate: what serving and `init_from_champion` use


def gate_tag(field: str) -> str:
    """The version tag holding one field of the gate's decision (`convllava.gate.decision`)."""
    return f"{TAG_GATE_PREFIX}{field}"


# --- metric names ---------------------------------------------------------------------------------------------------

TRAIN_LOSS = "train/loss"  # mean loss of the optimizer step over every worker: a stage's key metric
TRAIN_LR = "train/lr"  # the learning rate of the first parameter group
TRAIN_GRAD_NORM = "train/grad_norm"  # DeepSpeed's global gradient norm
TRAIN_SAMPLES_PER_S = "train/samples_per_s"  # global batch / step time
TRAIN_TOKENS_PER_S = "train/tokens_per_s"  # text tokens per second, every worker
TRAIN_VISUAL_TOKENS_PER_S = "train/visual_tokens_per_s"  # visual tokens per second, every worker
TRAIN_TEXT_PADDING_FRACTION = "train/text_padding_fraction"  # share of padded text positions
TRAIN_PEAK_MEMORY_GIB = "train/peak_memory_gib"  # the largest worker's peak accelerator memory
TRAIN_STEP_TIME_S = "train/step_time_s"  # wall-clock seconds of the step
TRAIN_EPOCH = "train/epoch"  # fractional epoch at the end of the step
TRAIN_WORLD_SIZE = "train/world_size"  # workers training the step (elastic stages change it)
STARTUP_PREFIX = "startup/"  # + `<phase>_s`: where a stage's start-up went, logged with its first step
PLAN_PREFIX = "plan/"  # the memory plan's params and metrics (`plan/per_gpu_peak_gib`, ...; jobs.train.plan)
EVAL_PREFIX = "eval/"  # + a suite metric (`eval/demo/overall`): the eval run's results
GATE_CANDIDATE = "gate/candidate"  # on the eval run: the candidate's primary metric
GATE_CHAMPION = "gate/champion"  # ... and the champion's it was compared with (when there was one)
WRITTEN = "written"  # preprocess's key metric: rows written over every data set
PREPROCESS_COUNTS = ("read", "written", "quarantined")  # per data set, `<data set>/<count>` on the preprocess run


def eval_metric(name: str) -> str:
    """The MLflow metric an eval result is logged as: `eval/` + its name, `@` spelled `_at_` (MLflow refuses `@`)."""
    return EVAL_PREFIX + name.replace("@", "_at_")


def startup_metric(phase: str) -> str:
    """The metric for one start-up phase (`startup/driver_s`)."""
    return f"{STARTUP_PREFIX}{phase}_s"


def preprocess_metric(dataset: str, count: str) -> str:
    """One data set's count on the preprocess run (`captions/written`)."""
    return f"{dataset}/{count}"


# --- artifact paths -------------------------------------------------------------------------------------------------

ARTIFACT_PIPELINE_CONFIG = "pipeline_config.json"  # the parent run's resolved pipeline config
ARTIFACT_STAGE_CONFIG = "stage_config.yaml"  # a stage run's resolved stage config (what `train --config` takes)
ARTIFACT_PLAN = "plan.txt"  # the memory plan's table (a pipeline's parent run: `<stage>/plan.txt`)
ARTIFACT_CHECKPOINT = "checkpoint.json"  # a stage run's checkpoint: URI, size, weights' sha256
ARTIFACT_TRAINABLE = "trainable_parameters.txt"  # a stage's trainable parameter groups
ARTIFACT_EVAL_DIR = "eval"  # the eval run's folder: the files below, the chart and the sample table
EVAL_METRICS_FILE = "metrics.json"  # the suite's results, flat (in the eval output folder and under `eval/`)
EVAL_PREDICTIONS_FILE = "predictions.jsonl"  # one line per question: prediction or error, reference
EVAL_REPORT_FILE = "report.md"  # the eval report (also the eval run's description)
EVAL_OUTPUT_FILES = (EVAL_METRICS_FILE, EVAL_PREDICTIONS_FILE, EVAL_REPORT_FILE)  # logged under `eval/`
ARTIFACT_ACCURACY_CHART = "eval/accuracy_vs_chance.png"  # accuracy per question type next to chance
ARTIFACT_SAMPLES = "eval/samples.json"  # sample predictions as an MLflow table, thumbnails included
LOGGED_MODEL_NAME = "model"  # the eval run's logged pyfunc model


def manifest_artifact(dataset: str) -> str:
    """The preprocess run's copy of one data set's shard manifest."""
    return f"manifests/{dataset}.json"
