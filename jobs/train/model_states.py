"""Model-state arithmetic: the bytes of weights, gradients, optimizer states and communication buckets one worker holds
under a DeepSpeed ZeRO config.

P parameters, T trainable, N workers, w bytes per weight (2 with bf16 on GPUs, 4 in fp32 on CPUs), L the largest
layer's parameters:
    ZeRO-2   weights wP, gradients (w + 4)T/N (this worker's partition, in the weights' dtype and in fp32),
             optimizer 12T/N (fp32 master + Adam's two moments of the partition)
    ZeRO-3   weights wP/N, gradients 4T/N, optimizer 12T/N, plus the gathered layer 2wL (DeepSpeed's estimator)
    offload  (`offload_param` / `offload_optimizer` to cpu) the offloaded states move to host memory
With every parameter trainable and w = 2 these are DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs`: 2P + 18P/N, `estimate_zero3_model_states_mem_needs`: 4L + 18P/N,
with offload 4L on the GPU and 18P·1.5 in host memory per node). DeepSpeed's communication buckets are the
reduce / all-gather / prefetch bucket sizes, in elements, × w. `jobs.train.plan` adds activations and the reserve.
"""

from __future__ import annotations

from typing import Any

from jobs.train.config import StageConfig


def model_states(
    config: StageConfig, total: int, trainable: int, largest: int, ds: dict[str, Any]
) -> tuple[dict[str, int], dict[str, int]]:
    """(per-GPU, per-worker host) bytes of weights, gradients, optimizer states and communication buckets."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    w = 2 if config.use_gpu else 4
    n = config.min_workers  # an elastic stage at its smallest: each worker's share is largest
    off_param = zero.get("offload_param", {}).get("device", "none") == "cpu" and stage == 3
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    if stage == 3:
        weights, grads = w * total / n, 4 * trainable / n
        gathered = 2 * w * largest
        buckets = w * (zero.get("reduce_bucket_size", 5e8) + zero.get("stage3_prefetch_bucket_size", 5e7))
    else:
        weights, grads = w * total, (w + 4) * trainable / n
        gathered = 0
        buckets = w * (zero.get("reduce_bucket_size", 5e8) + zero.get("allgather_bucket_size", 5e8))
    optimizer = 12 * trainable / n
    gpu = {"weights": weights, "gradients": grads, "optimizer states": optimizer}
    host: dict[str, float] = {}
    if off_opt:
        host["optimizer states"], gpu["optimizer states"] = optimizer, 0
        host["gradients"], gpu["gradients"] = 4 * trainable / n, 0
    if off_param:
        host["weights"], gpu["weights"] = weights, 0
    if stage == 3:
        gpu["gathered layer"] = gathered
    gpu["comm buckets"] = buckets
    return {k: int(v) for k, v in gpu.items()}, {k: int(v) for k, v in host.items()}
