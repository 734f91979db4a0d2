"""Benchmark metrics, each computing what the script behind the benchmark's published scores computes (quirks
included; each module names its reference); pure Python, no torch, no lmms-eval.

- text: VQA / TextVQA soft accuracy with the EvalAI answer processor (lmms-eval's textvqa); DocVQA ANLS (the
  challenge script, as lmms-eval's anls).
- yes_no: POPE (LLaVA's eval_pope.py reading; accuracy / precision / recall / F1 / yes-ratio); MME (lmms-eval's
  reading; acc, acc+, scores).
- choice: MMBench / SEED option extraction (lmms-eval's static MMBench reading), accuracy, CircularEval with rotated
  options.
- grounding: RefCOCO/+/g Precision@0.5 with LLaVA-1.5's box convention (padded-square or original frame).
- demo: per-type accuracy on the demo data's held-out sets, next to their chance levels.
"""

from convllava.metrics.choice import (
    ChoicePass,
    circular_accuracy,
    extract_choice,
    multiple_choice_accuracy,
    rotate_options,
)
from convllava.metrics.demo import DEMO_TYPES, demo_accuracy, normalize_short_answer
from convllava.metrics.grounding import GROUNDING_PROMPT, box_to_original, grounding_precision, iou, parse_box
from convllava.metrics.text import (
    CONTRACTIONS,
    anls,
    levenshtein,
    mean_anls,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_soft_accuracy,
)
from convllava.metrics.yes_no import (
    MME_COGNITION,
    MME_PERCEPTION,
    MMERecord,
    mme_scores,
    parse_mme_answer,
    parse_pope_answer,
    pope_metrics,
)

__all__ = [
    "CONTRACTIONS",
    "DEMO_TYPES",
    "GROUNDING_PROMPT",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "ChoicePass",
    "MMERecord",
    "anls",
    "box_to_original",
    "circular_accuracy",
    "demo_accuracy",
    "extract_choice",
    "grounding_precision",
    "iou",
    "levenshtein",
    "mean_anls",
    "mme_scores",
    "multiple_choice_accuracy",
    "normalize_short_answer",
    "normalize_vqa_answer",
    "parse_box",
    "parse_mme_answer",
    "parse_pope_answer",
    "pope_metrics",
    "rotate_options",
    "vqa_accuracy",
    "vqa_soft_accuracy",
]
