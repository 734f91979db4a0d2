"""Which parts of a ConvLLaVA model train: named groups chosen by configuration, never by code.

Groups (the paper's stages are lists of these):

| group | parameters |
|---|---|
| `vision` | the whole tower |
| `vision.stem` | the patchify stem |
| `vision.stage1` … `vision.stage5` | one ConvNeXt stage (`vision.stage5` is ConvLLaVA's added stage) |
| `projector` | the vision → LM projector |
| `llm` | the whole language model |
| `llm.embed_tokens` / `llm.lm_head` | the LM's input embeddings / output head |

Stage 1 (paper): `[vision.stage5, projector]`; stage 2: `[vision.stage3, vision.stage4, vision.stage5, projector, llm]`;
stage 3: `[projector, llm]`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from convllava.modeling.model import ConvLlavaForCausalLM


def group_prefixes(model: ConvLlavaForCausalLM) -> dict[str, list[str]]:
    """Group name → parameter-name prefixes in this model."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    def prefix_of(module: nn.Module) -> list[str]:
        return sorted({names[id(p)].rsplit(".", 1)[0] + "." for p in module.parameters()})

    tower = "vision_tower.model."
    groups = {
        "vision": ["vision_tower."],
        "vision.stem": [f"{tower}stem."],
        "projector": ["projector."],
        "llm": ["language_model."],
        "llm.embed_tokens": prefix_of(model.get_input_embeddings()),
        "llm.lm_head": prefix_of(model.get_output_embeddings()),
    }
    for i in range(len(model.vision_tower.model.stages)):
        groups[f"vision.stage{i + 1}"] = [f"{tower}stages.{i}."]
    return groups


def param_group(model: ConvLlavaForCausalLM, name: str, groups: dict[str, list[str]] | None = None) -> list[str]:
    """Names of the parameters in group `name`.

    Raises:
        ValueError: an unknown group, naming the known ones.
    """
    groups = groups or group_prefixes(model)
    if name not in groups:
        raise ValueError(f"unknown trainable group {name!r}; known groups: {sorted(groups)}")
    prefixes = tuple(groups[name])
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def set_trainable(model: ConvLlavaForCausalLM, trainable: Iterable[str]) -> list[str]:
    """Freeze everything, then unfreeze the named groups. Returns the trainable parameter names."""
    groups = group_prefixes(model)
    chosen = {n for g in trainable for n in param_group(model, g, groups)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    if not chosen:
        raise ValueError("no parameter is trainable; give at least one group")
    return sorted(chosen)


def trainable_table(model: ConvLlavaForCausalLM) -> list[tuple[str, int, int]]:
    """(module, trainable parameters, total parameters) for the tower's stem and stages, projector and LM."""
    groups = group_prefixes(model)
    rows = []
    for name in ["vision.stem", *[g for g in groups if g.startswith("vision.stage")], "projector", "llm"]:
        params = dict(model.named_parameters())
        members = [params[n] for n in param_group(model, name, groups)]
        rows.append((name, sum(numel(p) for p in members if p.requires_grad), sum(numel(p) for p in members)))
    return rows


def numel(param: nn.Parameter) -> int:
    """A parameter's full size, also when ZeRO-3 holds only a partition of it here (`ds_numel`)."""
    return getattr(param, "ds_numel", param.numel())


def format_table(rows: list[tuple[str, int, int]]) -> str:
    lines = [f"{'module':14s} {'trainable':>14s} {'total':>14s}"]
    lines += [f"{name:14s} {t:14,d} {n:14,d}" for name, t, n in rows]
    lines.append(f"{'all':14s} {sum(r[1] for r in rows):14,d} {sum(r[2] for r in rows):14,d}")
    return "\n".join(lines)
