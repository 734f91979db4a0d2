"""Peak memory and wall time of loading a released-layout ConvLLaVA checkpoint (`from_llava_checkpoint`), against
transformers' `LlamaForCausalLM.from_pretrained` on the same weights. Goals (issue 12): our extra peak ≤ 1.5× the
checkpoint's bytes, ≤ 0.5× more than transformers', and our time ≤ 1.5× transformers'.

    .venv/bin/python bench/checkpoint_load.py [--repeats 3] [--layers 18] [--out bench/results/checkpoint_load.json]

The checkpoint (built once into `work/bench-checkpoint-load/`, reused while its parameters match): a Llama LM of
~300M parameters (hidden 1024, 18 layers, intermediate 2816, vocab 32000, untied lm_head), every tensor
`torch.randn` in float16 (no model is initialised), written as float16 `.bin` shards of at most 200 MiB (four) with a
`pytorch_model.bin.index.json`; an `mlp2x_gelu` projector; a LLaVA `config.json` (`torch_dtype: float16`); the
tiny tokenizer; and a small five-stage HF ConvNext tower directory. transformers loads the *same* shard files: the
Hugging Face directory holds hard links to the LLaVA directory's LM shards, its own index and a Llama config.json
(the projector sits in a last, 2 MB LLaVA shard of its own).

Each measurement runs in a fresh child process (`--measure KIND DIR`): after the imports it resets the peak RSS
(`/proc/self/clear_refs` 5), reads VmRSS as the baseline, loads, and reports the extra peak (VmHWM − baseline) right
after the load and again after touching every weight once (`p.sum()` per parameter, no float32 temporaries), which
makes memory-mapped pages resident: the "touched" peak is the one copy a model in use costs, and the headline.
Wall time covers the load call only. Kinds:
- `ours`: `from_llava_checkpoint(dir, dtype=torch.float16)` (includes the tiny tokenizer and the processor);
- `transformers`: `LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float16)`;
- `ours_format`: `load_model` of the checkpoint `convllava convert` wrote (our format: float16 safetensors through
  `ConvLlavaForCausalLM.from_pretrained`);
- `convert`: `convllava convert` end to end (load + save_pretrained; default `--dtype auto` = float16), peak only
  (writing reads every weight once); its output feeds `ours_format`. save_pretrained's first call imports
  accelerate → DeepSpeed → MLflow, a fixed ~100 MiB: imported before the baseline and reported apart;
- `ours_float32`, `transformers_float32`: the same two loads to float32 (`dtype=None`, today's default; and
  `dtype=torch.float32`): every tensor is converted, so the model is 2× the float16 files and the shards' pages come
  on top while they are mapped — one shard at a time for ours, all shards at once for transformers, which maps every
  `.bin` shard before converting any;
- `old`: the loader before issue 12 (`git show c73edd2:convllava/checkpoint.py`, float32 random init, every shard
  merged, then `.to(float16)`), for contrast; skipped with `--no-old` or where git cannot show it.
Per repeat the kinds run interleaved; the table gives medians. The page cache is warm for all (the files were just
written or read). The 1-minute load average before and after the run is recorded: this 2-core machine is shared, so
wall times are noisy; memory is not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "bench-checkpoint-load"
OLD_COMMIT = "c73edd2"
SHARD_BYTES = 200 * 2**20
TOWER = dict(depths=[1, 1, 2, 1, 1], hidden_sizes=[16, 32, 64, 96, 128])
GOALS = {"ours_peak_over_bytes": 1.5, "ours_minus_transformers_over_bytes": 0.5, "ours_time_over_transformers": 1.5}


def llm_config(layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )


def prepare(layers: int) -> dict[str, Path]:
    """The LLaVA-layout directory, the tower, and the HF directory sharing its LM shards; rebuilt when stale."""
    import torch
    from transformers import ConvNextConfig, ConvNextModel, LlamaConfig, LlamaForCausalLM

    from convllava.processing.tokenizer import load_tokenizer

    dirs = {"llava": WORK / "llava", "tower": WORK / "tower", "hf": WORK / "hf", "ours": WORK / "ours"}
    stamp, params = WORK / "params.json", {"llm": llm_config(layers), "tower": TOWER, "shard_bytes": SHARD_BYTES}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return dirs
    import shutil

    shutil.rmtree(WORK, ignore_errors=True)
    for d in dirs.values():
        d.mkdir(parents=True)
    t = time.perf_counter()
    tower = ConvNextModel(ConvNextConfig(num_stages=5, image_size=256, **TOWER))
    tower.config.save_pretrained(dirs["tower"])
    torch.save(tower.state_dict(), dirs["tower"] / "pytorch_model.bin")

    config = LlamaConfig(**llm_config(layers), dtype="float16")
    with torch.device("meta"):  # shapes only
        shapes = LlamaForCausalLM(config).state_dict()
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for key, meta in shapes.items():
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + meta.nbytes > SHARD_BYTES:
            shards.append({})
        shards[-1][key] = torch.randn(meta.shape, generator=gen, dtype=torch.float16) * 0.02
    width = config.hidden_size
    projector = {
        "model.mm_projector.0.weight": torch.randn(width, 128, generator=gen, dtype=torch.float16),
        "model.mm_projector.0.bias": torch.zeros(width, dtype=torch.float16),
        "model.mm_projector.2.weight": torch.randn(width, width, generator=gen, dtype=torch.float16),
        "model.mm_projector.2.bias": torch.zeros(width, dtype=torch.float16),
    }
    n_hf, n_llava = len(shards), len(shards) + 1
    hf_map, llava_map = {}, {}
    for i, shard in enumerate(shards, start=1):
        hf_name, llava_name = f"pytorch_model-{i:05d}-of-{n_hf:05d}.bin", f"pytorch_model-{i:05d}-of-{n_llava:05d}.bin"
        torch.save(shard, dirs["hf"] / hf_name)
        os.link(dirs["hf"] / hf_name, dirs["llava"] / llava_name)  # the very same file for both loaders
        hf_map.update(dict.fromkeys(shard, hf_name))
        llava_map.update(dict.fromkeys(shard, llava_name))
    last = f"pytorch_model-{n_llava:05d}-of-{n_llava:05d}.bin"
    torch.save(projector, dirs["llava"] / last)
    llava_map.update(dict.fromkeys(projector, last))
    lm_bytes = sum(v.nbytes for shard in shards for v in shard.values())
    for directory, weight_map, total in (
        (dirs["hf"], hf_map, lm_bytes),
        (dirs["llava"], llava_map, lm_bytes + sum(v.nbytes for v in projector.values())),
    ):
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(dirs["hf"])
    llava = config.to_dict() | {
        "model_type": "llava",
        "architectures": ["LlavaLlamaForCausalLM"],
        "torch_dtype": "float16",
        "mm_vision_tower": str(dirs["tower"]),
        "mm_hidden_size": 128,
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_vision_select_layer": -1,
        "mm_use_im_start_end": False,
    }
    (dirs["llava"] / "config.json").write_text(json.dumps(llava, indent=2))
    load_tokenizer("tiny").save_pretrained(dirs["llava"])
    stamp.write_text(json.dumps(params))
    print(f"built {WORK} in {time.perf_counter() - t:.0f}s: {n_hf} LM shards, {lm_bytes / 2**20:.0f} MiB", flush=True)
    return dirs


# ---------------------------------------------------------------------------------------------- child process
def _status(key: str) -> int:
    return next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(key + ":")
    )


def _old_loader():
    """The pre-issue-12 `convllava/modeling/checkpoint.py`, imported from a file written out of git (module `old_checkpoint`)."""
    import importlib.util

    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:convllava/checkpoint.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = WORK / "old_checkpoint.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.from_llava_checkpoint


def measure(kind: str, directory: str, output: str | None) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    from convllava.modeling.checkpoint import load_model
    from convllava.modeling.llava_checkpoint import from_llava_checkpoint

    old = _old_loader() if kind == "old" else None
    imports = 0
    if kind == "convert":
        from transformers.modeling_utils import unwrap_model

        from jobs import cli

        # save_pretrained's first call imports accelerate, which imports DeepSpeed and MLflow (~100 MiB, whatever the
        # model's size): done before the baseline, and reported apart, so that the peak counts weights only.
        before = _status("VmRSS")
        unwrap_model(torch.nn.Linear(1, 1))
        imports = _status("VmRSS") - before
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    start = time.perf_counter()
    if kind == "ours":
        model = from_llava_checkpoint(directory, dtype=torch.float16)[0]
    elif kind == "ours_float32":
        model = from_llava_checkpoint(directory)[0]
    elif kind == "transformers_float32":
        model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    elif kind == "old":
        model = old(directory, dtype=torch.float16)[0]
    elif kind == "transformers":
        model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float16)
    elif kind == "ours_format":
        model = load_model(directory)[0]
    elif kind == "convert":
        try:
            cli.main(["convert", "--llava", directory, "--output", output])
        except SystemExit as e:
            assert e.code == 0, e.code
        return {
            "kind": kind,
            "seconds": time.perf_counter() - start,
            "extra_peak": _status("VmHWM") - base,
            "save_pretrained_imports": imports,
        }
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    loaded_peak = _status("VmHWM") - base
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    with torch.no_grad():  # every weight's pages read once, no float32 temporaries
        for p in model.parameters():
            p.sum()
    return {
        "kind": kind,
        "seconds": seconds,
        "loaded_peak": loaded_peak,
        "extra_peak": _status("VmHWM") - base,
        "param_bytes": sum(p.nbytes for p in model.parameters()),
        "dtypes": dtypes,
    }


# ---------------------------------------------------------------------------------------------- driver
def run_child(kind: str, directory: Path, output: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", kind, str(directory)] + ([str(output)] if output else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{kind}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def old_available() -> bool:
    cmd = ["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_COMMIT}:convllava/checkpoint.py"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--no-old", action="store_true", help="leave out the pre-issue-12 loader")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_load.json"))
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # child process: KIND DIR [OUTPUT]
    args = parser.parse_args()
    if args.measure:
        kind, directory, *output = args.measure
        print(json.dumps(measure(kind, directory, output[0] if output else None)))
        return

    load_start = os.getloadavg()
    dirs = prepare(args.layers)
    stored = sum(f.stat().st_size for f in dirs["llava"].glob("*.bin"))
    lm_stored = sum(f.stat().st_size for f in dirs["hf"].glob("*.bin"))
    kinds = ["convert", "ours", "transformers", "ours_format", "ours_float32", "transformers_float32"]
    kinds += [] if args.no_old or not old_available() else ["old"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for kind in kinds:
            directory = {
                "ours": dirs["llava"],
                "ours_float32": dirs["llava"],
                "old": dirs["llava"],
                "convert": dirs["llava"],
                "transformers": dirs["hf"],
                "transformers_float32": dirs["hf"],
                "ours_format": dirs["ours"],
            }[kind]
            result = run_child(kind, directory, dirs["ours"] if kind == "convert" else None)
            result["load1"] = os.getloadavg()[0]
            runs[kind].append(result)
            print(
                f"repeat {repeat + 1} {kind:13s} {result['seconds']:6.2f}s  extra peak "
                f"{result['extra_peak'] / 2**20:7.0f} MiB",
                flush=True,
            )

    def med(kind: str, key: str) -> float | None:
        values = [r[key] for r in runs.get(kind, []) if key in r]
        return statistics.median(values) if values else None

    summary = {
        k: {
            "seconds": med(k, "seconds"),
            "extra_peak_bytes": med(k, "extra_peak"),
            "loaded_peak_bytes": med(k, "loaded_peak"),
            "extra_peak_over_checkpoint": med(k, "extra_peak") / stored,
        }
        for k in kinds
    }
    ratios = {
        "ours_peak_over_bytes": med("ours", "extra_peak") / stored,
        "ours_minus_transformers_over_bytes": (med("ours", "extra_peak") - med("transformers", "extra_peak")) / stored,
        "ours_time_over_transformers": med("ours", "seconds") / med("transformers", "seconds"),
        "ours_format_peak_over_bytes": med("ours_format", "extra_peak") / stored,
        "convert_peak_over_bytes": med("convert", "extra_peak") / stored,
        "ours_float32_peak_over_bytes": med("ours_float32", "extra_peak") / stored,
        "transformers_float32_peak_over_bytes": med("transformers_float32", "extra_peak") / stored,
        "ours_float32_time_over_transformers": med("ours_float32", "seconds") / med("transformers_float32", "seconds"),
    }
    if "old" in runs:
        ratios["old_peak_over_bytes"] = med("old", "extra_peak") / stored
        ratios["old_time_over_ours"] = med("old", "seconds") / med("ours", "seconds")
    result = {
        "checkpoint": {
            "llm": llm_config(args.layers),
            "bytes": stored,
            "lm_bytes": lm_stored,
            "shards": sorted(f.name for f in dirs["llava"].glob("*.bin")),
        },
        "repeats": args.repeats,
        "ratios": ratios,
        "goals": GOALS,
        "goals_met": {k: ratios[k] <= v for k, v in GOALS.items()},
        "median": summary,
        "runs": runs,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "bench_seconds": time.perf_counter() - started,
    }
    gib = 2**20
    print(f"\ncheckpoint {stored / gib:.0f} MiB float16 (.bin shards); medians of {args.repeats} fresh processes\n")
    print("| load | seconds | extra peak, loaded (MiB) | extra peak, weights touched (MiB) | × checkpoint |")
    print("|---|---|---|---|---|")
    for k in kinds:
        s = summary[k]
        loaded = "–" if s["loaded_peak_bytes"] is None else f"{s['loaded_peak_bytes'] / gib:.0f}"
        print(
            f"| {k} | {s['seconds']:.2f} | {loaded} | {s['extra_peak_bytes'] / gib:.0f} | "
            f"{s['extra_peak_over_checkpoint']:.2f} |"
        )
    print()
    for k, v in ratios.items():
        goal = GOALS.get(k)
        print(f"{k:40s} {v:6.2f}" + (f"  (goal ≤ {goal}: {'met' if v <= goal else 'NOT met'})" if goal else ""))
    print(f"load average {load_start[0]:.1f} at start, {result['load_avg_end'][0]:.1f} at end")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
