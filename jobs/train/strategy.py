"""DeepSpeed and Ray placement behind one small object: the rest of the job never touches either directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from jobs.train.config import StageConfig


class DeepSpeedStrategy:
    """Fills the shipped DeepSpeed JSON from the stage config and owns engine set-up, checkpoints, consolidation.

    CPU: gloo, fp32, torch AdamW (`zero_allow_untested_optimizer`). GPU: nccl, bf16.
    """

    def __init__(self, config: StageConfig, world_size: int) -> None:
        self.config = config
        self.world_size = world_size
        self.ds_config = self._fill(config.deepspeed_config())

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def scaling_config(self):
        from ray.train import ScalingConfig

        resources = {"CPU": 1, "GPU": 1} if self.config.use_gpu else {"CPU": 1}
        # An elastic stage: Ray Train starts as many workers as fit, MIN to MAX, restarts the group with those left
        # when one is lost, and grows it back when capacity returns (every restart resumes the last checkpoint).
        elastic = {"elastic_resize_monitor_interval_s": self.config.resize_check_s} if self.config.elastic else {}
        return ScalingConfig(
            num_workers=self.config.workers, use_gpu=self.config.use_gpu, resources_per_worker=resources, **elastic
        )

    def _fill(self, ds: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        if not c.min_workers <= self.world_size <= c.max_workers:
            raise ValueError(f"DeepSpeed world size {self.world_size} is not the configured workers {c.workers}")
        ds = dict(ds)
        ds["train_micro_batch_size_per_gpu"] = c.micro_batch_size
        ds["gradient_accumulation_steps"] = c.accum_at(self.world_size)
        ds["train_batch_size"] = c.global_batch_size
        ds["gradient_clipping"] = c.max_grad_norm
        ds["zero_allow_untested_optimizer"] = True
        if c.use_gpu:
            ds["bf16"] = {"enabled": True}
        return ds

    def model_context(self):
        """The context a model is built and loaded in. Under ZeRO-3: transformers' DeepSpeed integration
        (`HfDeepSpeedConfig`, held while the context is open) makes `from_pretrained` / `_from_config` build inside
        `deepspeed.zero.Init`, so every rank only ever holds its partition, and load a checkpoint into the
        partitioned model with rank 0 reading the memory-mapped files and the others taking keys and shapes only.
        Parameters stay partitioned after the context closes; `deepspeed.initialize` takes them as they are."""
        import contextlib

        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        if torch.distributed.is_initialized():
            # DeepSpeed's config checks train_batch_size against *its* world size: join the process group Ray
            # Train made before it reads the config (deepspeed.initialize would do the same later).
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())

        @contextlib.contextmanager
        def zero3():
            held = HfDeepSpeedConfig(self.ds_config)  # noqa: F841 - transformers keeps only a weak reference
            try:
                yield
            finally:
                unset_hf_deepspeed_config()

        return zero3()

    def build_partitioned(self, init_from: str, attn_implementation: str | None = None):
        """A checkpoint of our format built and loaded for ZeRO-3 with no rank ever holding more than its partition
        plus the one module being constructed: the model is made under `deepspeed.zero.Init` without random init, then
        each rank reads *its slice* of every flattened parameter from the safetensors files (`load_partitions`).
        transformers' own ZeRO-3 loader instead gathers every layer whole on every rank to let rank 0 copy it in.
        Call inside `model_context()`."""
        import deepspeed
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
        from transformers.modeling_utils import set_zero3_state

        from convllava.io.storage import resolve_local
        from convllava.modeling.config import ConvLlavaConfig
        from convllava.modeling.model import ConvLlavaForCausalLM
        from convllava.modeling.weights import FlatRanges
        from convllava.processing.processor import ConvLlavaProcessor

        directory = resolve_local(init_from)
        config = ConvLlavaConfig.from_pretrained(directory)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        # `_from_config`'s ZeRO-3 contexts, without its random init afterwards (which gathers every layer whole in
        # turn and leaves each rank holding far more than its partition): every value is read from the checkpoint.
        with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=self.ds_config):
            with set_zero3_state():  # the LM built inside our __init__ joins this zero.Init instead of its own
                model = ConvLlavaForCausalLM(config)
        load_partitions(model, FlatRanges(directory))
        return model.eval(), ConvLlavaProcessor.from_pretrained(directory)

    def setup(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler_fn: Callable[[torch.optim.Optimizer], Any],
    ):
        import deepspeed

        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler_fn, config=self.ds_config
        )
        return engine, scheduler

    def full_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere). Collective under ZeRO-3, which partitions them."""
        module = engine.module
        if self.zero_stage < 3:
            return (
                {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                if engine.global_rank == 0
                else None
            )
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if engine.global_rank == 0:
                    state[name] = param.detach().cpu().clone()
        if engine.global_rank != 0:
            return None
        for name, buf in module.named_buffers():
            state.setdefault(name, buf.detach().cpu().clone())
        persistent = set(module.state_dict().keys())
        return {k: v for k, v in state.items() if k in persistent}


def load_partitions(model: torch.nn.Module, source) -> None:
    """Fill a ZeRO-3 model's partitions from `source` (`convllava.modeling.weights.FlatRanges`): DeepSpeed keeps rank r's
    elements [r*n, (r+1)*n) of each flattened parameter (n = its partition size, the last one zero-padded), so each
    rank reads just those. Buffers are not partitioned: every rank reads them whole (they are small).

    Raises:
        CheckpointError: naming a parameter or buffer the checkpoint does not hold.
    """
    import torch.distributed as dist

    from convllava.modeling.weights import CheckpointError

    keys = source.keys()
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    with torch.no_grad():
        for _, param in model.named_parameters():
            stored = [n for n in names[id(param)] if n in keys]
            if not stored:
                raise CheckpointError(f"{source.directory}: no weights for {' / '.join(names[id(param)])}")
            size = param.ds_tensor.ds_numel
            rank = dist.get_rank(group=getattr(param, "ds_process_group", None))
            start, end = rank * size, min((rank + 1) * size, param.ds_numel)
            param.ds_tensor.zero_()
            if start < end:
                param.ds_tensor[: end - start].copy_(source.read(stored[0], start, end))
        for name, buffer in model.named_buffers():
            if name in keys:
                buffer.copy_(source.read(name, 0, buffer.numel()).view_as(buffer))
