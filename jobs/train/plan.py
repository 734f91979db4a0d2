"""The memory plan of a stage before it launches: what each GPU will hold, against what it has.

`plan_stage(config)` builds the stage's model on the meta device (nothing allocated, a 7B model in a second), counts
parameters per group, and adds up the bytes one worker holds at its peak:

- model states (weights, gradients, optimizer states) under the configured ZeRO stage, precision and offload, and
  DeepSpeed's communication buckets: `jobs.train.model_states`.
- activations of the largest micro-batch the shards hold, measured on fake tensors (`jobs.train.memory`): the
  bucket with the most pixels and the one with the longest sequence, each at its longest length, padded as
  `collate` pads. Both with and without gradient checkpointing; the configured one counts.
- a fixed reserve on GPUs (CUDA context, NCCL buffers, allocator fragmentation): max(2 GiB, 5% of the GPU).

The per-GPU peak is checked against the GPU's memory (`--gpu-memory`, else the visible GPU's, else an 80 GiB
H100/A100 is assumed and said so). CPU workers are planned against host memory shared by the workers.
`convllava plan` prints the table; `convllava train` and `pipeline run` run the same plan first and refuse a
stage that does not fit (`jobs.train.preflight`), logging the plan to the stage's MLflow run either way.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convllava.io.config import ConfigLoadError
from convllava.io.storage import is_s3, read_bytes
from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.modeling.trainable import set_trainable, trainable_table
from convllava.processing.buckets import Bucket
from jobs.train.config import StageConfig
from jobs.train.memory import ActivationMemory, largest_layer_params, measure_activations
from jobs.train.model_states import model_states

GIB = 2**30
ASSUMED_GPU_GIB = 80.0
ASSUMED_SEQ_LEN = 2048  # LLaVA's model_max_length, used when the shards cannot be read
FITS, DOES_NOT_FIT = 0, 3  # `convllava plan` exit codes


@dataclass(frozen=True)
class Geometry:
    """One micro-batch's shape: `micro_batch_size` sequences of `seq_len` tokens with images of `image_size`."""

    bucket: str
    seq_len: int
    image_size: tuple[int, int] | None


@dataclass
class MemoryPlan:
    config: StageConfig
    model_config: ConvLlavaConfig
    groups: list[tuple[str, int, int]]  # (group, trainable, total)
    largest_layer: int
    zero_stage: int
    offload_param: bool
    offload_optimizer: bool
    weight_bytes: int  # w
    model_states: dict[str, int]  # per GPU
    host_states: dict[str, int]  # per worker, offloaded states
    geometry: list[Geometry]  # the micro-batches measured
    geometry_note: str
    activations: dict[bool, ActivationMemory]  # gradient checkpointing → worst over `geometry`
    worst: dict[bool, Geometry]
    device_memory: int
    device_note: str
    reserve: int
    steps_per_epoch: int | None
    steps_note: str
    advice: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(g[2] for g in self.groups)

    @property
    def trainable_params(self) -> int:
        return sum(g[1] for g in self.groups)

    @property
    def model_state_bytes(self) -> int:
        return sum(self.model_states.values())

    def peak_bytes(self, gradient_checkpointing: bool | None = None) -> int:
        ckpt = self.config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        return self.model_state_bytes + self.activations[ckpt].peak_bytes + self.reserve

    @property
    def fits(self) -> bool:
        return self.peak_bytes() <= self.device_memory

    def format(self) -> str:
        c = self.config
        lines = [
            f"plan for {c.name}: {c.workers} {'GPU' if c.use_gpu else 'CPU'} worker(s), ZeRO-{self.zero_stage}"
            f"{' + offload ' + self._offload_name() if self._offload_name() else ''}, "
            f"{'bf16' if self.weight_bytes == 2 else 'fp32'}, micro-batch {c.micro_batch_size}, "
            f"gradient accumulation {c.grad_accum}, global batch {c.global_batch_size}",
            "",
        ]
        lines.append(f"{'parameters':24s} {'trainable':>16s} {'total':>16s}")
        lines += [f"  {name:22s} {t:16,d} {n:16,d}" for name, t, n in self.groups]
        lines.append(f"  {'all':22s} {self.trainable_params:16,d} {self.total_params:16,d}")
        lines.append(f"  {'largest layer':22s} {'':16s} {self.largest_layer:16,d}")
        lines += ["", f"{'per GPU' if c.use_gpu else 'per worker':32s} {'GiB':>8s}"]
        lines += [f"  {name:30s} {_gib(b):8.2f}" for name, b in self.model_states.items()]
        for ckpt in (True, False):
            a, g = self.activations[ckpt], self.worst[ckpt]
            mark = "*" if ckpt == c.gradient_checkpointing else " "
            name = "activations, " + ("checkpointed" if ckpt else "no checkpointing")
            lines.append(
                f"{mark} {name:30s} {_gib(a.peak_bytes):8.2f}   bucket {g.bucket}, {g.seq_len} tokens; "
                f"forward keeps {_gib(a.forward_bytes):.2f}"
            )
        lines.append(
            f"  {'reserve':30s} {_gib(self.reserve):8.2f}"
            + ("   CUDA context, NCCL, fragmentation" if c.use_gpu else "")
        )
        lines.append("  (* the configured gradient_checkpointing; the peak counts that row)")
        if self.host_states:
            lines.append(
                f"  host memory per worker (offloaded): {_gib(sum(self.host_states.values())):.2f} GiB ("
                + ", ".join(f"{k} {_gib(v):.2f}" for k, v in self.host_states.items())
                + ")"
            )
        lines += [
            "",
            f"activations measured for: {self.geometry_note}",
            f"memory: {self.device_note}",
            f"steps per epoch: {self._steps()}",
        ]
        if not self.fits:
            lines += ["", "does not fit; change one of:"] + [f"  - {a}" for a in self.advice]
        lines.append(f"per-GPU peak: {_gib(self.peak_bytes()):.2f} GiB of {_gib(self.device_memory):.2f} GiB")
        return "\n".join(lines)

    def _offload_name(self) -> str:
        return "+".join(n for n, on in (("params", self.offload_param), ("optimizer", self.offload_optimizer)) if on)

    def _steps(self) -> str:
        return f"{self.steps_per_epoch}" if self.steps_per_epoch is not None else f"unknown ({self.steps_note})"

    def params(self) -> dict[str, Any]:
        """What the stage's MLflow run records (`plan/...` params)."""
        g = self.worst[self.config.gradient_checkpointing]
        return {
            "plan/zero_stage": self.zero_stage,
            "plan/offload": self._offload_name() or "none",
            "plan/bucket": g.bucket,
            "plan/seq_len": g.seq_len,
            "plan/device_memory_gib": round(_gib(self.device_memory), 2),
            "plan/fits": self.fits,
        }

    def metrics(self) -> dict[str, float]:
        out = {f"plan/{k}_gib": _gib(v) for k, v in self.model_states.items()}
        out["plan/activations_gib"] = _gib(self.activations[self.config.gradient_checkpointing].peak_bytes)
        out["plan/activations_no_checkpointing_gib"] = _gib(self.activations[False].peak_bytes)
        out["plan/activations_checkpointed_gib"] = _gib(self.activations[True].peak_bytes)
        out["plan/per_gpu_peak_gib"] = _gib(self.peak_bytes())
        out["plan/parameters"] = float(self.total_params)
        out["plan/trainable_parameters"] = float(self.trainable_params)
        if self.steps_per_epoch is not None:
            out["plan/steps_per_epoch"] = float(self.steps_per_epoch)
        return out


def _gib(n: int | float) -> float:
    return n / GIB


def model_config_for(config: StageConfig) -> ConvLlavaConfig:
    """The architecture a stage trains: `init_from`'s config.json (only that file is read), else the preset."""
    if config.init_from:
        uri = config.init_from.rstrip("/")
        if is_s3(uri):
            try:
                raw = read_bytes(f"{uri}/config.json")
            except OSError as e:  # pyarrow's errors; say which object
                raise FileNotFoundError(f"{uri}/config.json: cannot be read ({type(e).__name__}: {e})") from e
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "config.json").write_bytes(raw)
                return ConvLlavaConfig.from_pretrained(tmp)
        if not Path(uri, "config.json").is_file():
            raise FileNotFoundError(f"{uri}/config.json: no such file (init_from must be a convllava checkpoint)")
        return ConvLlavaConfig.from_pretrained(uri)
    if config.preset:
        return ConvLlavaConfig.from_preset(config.preset)
    raise ConfigLoadError(f"stage config {config.name!r}: init_from/preset: give one to plan (preset=convllava-1536)")


def _geometries(
    config: StageConfig,
    model_config: ConvLlavaConfig,
    seq_len: int | None,
    image_size: tuple[int, int] | None,
    assumed: tuple[int, tuple[int, int]] | None,
) -> tuple[list[Geometry], str, int | None, str]:
    """The micro-batches to measure, why those, and the steps per epoch (or why unknown)."""
    from convllava.data.shards import ShardSet
    from jobs.train.epochs import stage_plan

    try:
        shards = ShardSet(config.data)
    except Exception as e:  # noqa: BLE001 - any reason the shards are not there yet; the plan says it
        reason = f"shards at {config.data} not readable: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        r = model_config.image_resolution
        fallback_len, fallback_size = assumed or (ASSUMED_SEQ_LEN, (r, r))
        size = image_size or fallback_size
        g = Geometry(f"{size[0]}x{size[1]}", seq_len or fallback_len, size)
        return [g], f"{g.bucket} images, {g.seq_len} tokens, assumed (shards not readable yet)", None, reason
    layout = shards.layout
    longest = {
        name: int(layout.lengths[layout.buckets == code].max())
        for code, name in enumerate(layout.bucket_names)
        if (layout.buckets == code).any()
    }
    if not longest:
        raise ValueError(f"{config.data}: the shards hold no samples")

    def pixels(bucket: str) -> int:
        return 0 if not bucket[:1].isdigit() else Bucket.parse(bucket).height * Bucket.parse(bucket).width

    chosen = {max(longest, key=lambda b: (pixels(b), longest[b])), max(longest, key=lambda b: (longest[b], pixels(b)))}
    geometry = []
    for b in sorted(chosen):
        size = None if not pixels(b) else (Bucket.parse(b).height, Bucket.parse(b).width)
        geometry.append(Geometry(b, seq_len or longest[b], image_size or size))
    note = ", ".join(f"bucket {g.bucket} at {g.seq_len} tokens" for g in geometry)
    note += f" (largest image and longest sample of {len(shards):,d} samples in {len(longest)} buckets)"
    try:
        steps = stage_plan(layout, config, 0, config.max_workers).num_steps
        return geometry, note, steps, ""
    except ValueError as e:
        return geometry, note, None, str(e)


def _device_memory(config: StageConfig, gpu_memory_gib: float | None) -> tuple[int, str]:
    if gpu_memory_gib is not None:
        return int(gpu_memory_gib * GIB), f"{gpu_memory_gib:g} GiB per GPU as given (--gpu-memory)"
    if not config.use_gpu:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        share = total // config.max_workers
        return share, f"CPU workers: this host's {_gib(total):.1f} GiB shared by {config.max_workers} worker(s)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name}: {_gib(props.total_memory):.1f} GiB (visible GPU 0)"
    return int(ASSUMED_GPU_GIB * GIB), f"no GPU visible here: {ASSUMED_GPU_GIB:g} GiB assumed (pass --gpu-memory)"


def plan_stage(
    config: StageConfig,
    *,
    gpu_memory_gib: float | None = None,
    seq_len: int | None = None,
    image_size: tuple[int, int] | None = None,
    assumed: tuple[int, tuple[int, int]] | None = None,
) -> MemoryPlan:
    """The stage's memory plan (see the module docstring).

    Args:
        seq_len / image_size: plan for these instead of the shards' longest sample and largest bucket.
        assumed: (seq_len, image size) when the shards cannot be read yet (a pipeline before preprocessing: its
            max_length and resolution); default LLaVA's 2048 tokens and the model's square resolution.
    """
    model_config = model_config_for(config)
    with torch.device("meta"):
        model = ConvLlavaForCausalLM(model_config)
    set_trainable(model, config.trainable)
    groups = trainable_table(model)
    largest = largest_layer_params(model)
    total, trainable = sum(g[2] for g in groups), sum(g[1] for g in groups)
    ds = config.deepspeed_config()
    gpu, host = model_states(config, total, trainable, largest, ds)
    zero = ds.get("zero_optimization", {})
    geometry, note, steps, steps_note = _geometries(config, model_config, seq_len, image_size, assumed)
    activations, worst = {}, {}
    for ckpt in (True, False):
        measured = [(_measure(model_config, config, g, config.micro_batch_size, ckpt), g) for g in geometry]
        activations[ckpt], worst[ckpt] = max(measured, key=lambda m: m[0].peak_bytes)
    memory, memory_note = _device_memory(config, gpu_memory_gib)
    reserve = max(2 * GIB, memory // 20) if config.use_gpu else 0
    plan = MemoryPlan(
        config=config,
        model_config=model_config,
        groups=groups,
        largest_layer=largest,
        zero_stage=int(zero.get("stage", 0)),
        offload_param="weights" in host,
        offload_optimizer="optimizer states" in host,
        weight_bytes=2 if config.use_gpu else 4,
        model_states=gpu,
        host_states=host,
        geometry=geometry,
        geometry_note=note,
        activations=activations,
        worst=worst,
        device_memory=memory,
        device_note=memory_note,
        reserve=reserve,
        steps_per_epoch=steps,
        steps_note=steps_note,
    )
    plan.advice = _advice(plan)
    return plan


def _measure(
    model_config: ConvLlavaConfig, config: StageConfig, g: Geometry, micro_batch_size: int, gradient_checkpointing: bool
) -> ActivationMemory:
    return measure_activations(
        model_config,
        config.trainable,
        micro_batch_size=micro_batch_size,
        seq_len=g.seq_len,
        image_size=g.image_size,
        dtype=torch.bfloat16 if config.use_gpu else torch.float32,
        gradient_checkpointing=gradient_checkpointing,
    )


def _peak(a: ActivationMemory) -> int:
    return a.peak_bytes


def _advice(plan: MemoryPlan) -> list[str]:
    """What would bring a plan that does not fit under its GPU's memory, in the order a user tries them."""
    if plan.fits:
        return []
    c, out = plan.config, []
    over = plan.peak_bytes() - plan.device_memory
    if not c.gradient_checkpointing and plan.peak_bytes(True) <= plan.device_memory:
        out.append(
            f"gradient checkpointing: gradient_checkpointing=true brings the peak to "
            f"{_gib(plan.peak_bytes(True)):.1f} GiB"
        )
    act = plan.activations[c.gradient_checkpointing].peak_bytes
    if c.micro_batch_size > 1:
        # The largest smaller micro-batch that keeps the accumulation whole and, measured again, fits.
        for m in range(c.micro_batch_size - 1, 0, -1):
            sizes = range(c.min_workers, c.max_workers + 1)
            if any(c.global_batch_size % (m * n) for n in sizes) or act * m / c.micro_batch_size > act - over:
                continue  # activations grow at least linearly with the micro-batch: this one cannot fit
            smaller = max(
                (_measure(plan.model_config, c, g, m, c.gradient_checkpointing) for g in plan.geometry), key=_peak
            )
            if plan.peak_bytes() - act + smaller.peak_bytes <= plan.device_memory:
                out.append(
                    f"micro-batch: micro_batch_size={m} (peak {_gib(plan.peak_bytes() - act + smaller.peak_bytes):.1f}"
                    f" GiB; gradient accumulation rises to {c.global_batch_size // (m * c.max_workers)})"
                )
                break
    if plan.zero_stage < 3:
        out.append("ZeRO stage: deepspeed=zero3 partitions the weights and gradients over the workers too")
    if not (plan.offload_param and plan.offload_optimizer):
        out.append("offload: deepspeed=zero3_offload moves weights and optimizer states to host memory")
    if not out:
        out.append("more GPUs (--gpus / workers=) or GPUs with more memory: nothing in this config brings it under")
    return out


def plan_json(plan: MemoryPlan) -> dict[str, Any]:
    """The plan's figures as JSON (bench/gpu_train_check.py puts them next to the measured ones)."""
    return {**plan.params(), **plan.metrics()}
