"""The sweep, data-parallel over torch.distributed (one process per GPU, or gloo on CPU).

Launch with ``torchrun --nproc_per_node N -m ltt_exit.cli.calibrate …`` (or ``accelerate launch``):
the launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and
:func:`run_sweep_distributed` does the rest.

Sharding rule: example i (in the calibration set's order) goes to rank i mod world_size. Each
rank decodes its shard into its own resumable partial file; a rank that dies leaves the others'
files intact, and a rerun with the same world size resumes every rank where it stopped. After a
barrier rank 0 reads every part and assembles the table in the calibration set's order, so the
table equals the single-process table row for row.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Callable

from ltt_exit.sweep.partial import PartialSweep
from ltt_exit.sweep.run import (
    SweepResult,
    SweepSpec,
    assemble_table,
    decode_examples,
    partial_path,
    prepare_sweep,
    table_metadata,
)


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Join the process group the launcher set up; returns (rank, world_size, local_rank).

    NCCL for CUDA, gloo for CPU. The timeout is long because shards can differ in length by many
    minutes and ranks wait for each other only at the end.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def run_sweep_distributed(
    decoder,
    calibration_set,
    spec: SweepSpec,
    *,
    out_path: str | Path,
    model_fingerprint: str,
    metadata: dict | None = None,
    progress: bool = True,
    after_example: Callable[[int], None] | None = None,
) -> SweepResult:
    """Like :func:`ltt_exit.sweep.run_sweep`, sharded over the initialised process group.

    Every rank returns a SweepResult; only rank 0's carries the table (others get None).
    """
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    examples, key = prepare_sweep(decoder, calibration_set, spec, model_fingerprint)
    out_path = Path(out_path)
    shard = examples[rank::world_size]
    partial = PartialSweep(partial_path(out_path, rank, world_size), key)
    resumed = len(partial)
    start = time.perf_counter()
    decoded = decode_examples(decoder, shard, spec, partial, progress=progress and rank == 0,
                              desc=f"sweep (rank 0 of {world_size})", after_example=after_example)
    seconds = time.perf_counter() - start
    dist.barrier()
    table = None
    if rank == 0:
        parts = [PartialSweep(partial_path(out_path, r, world_size), key) for r in range(world_size)]
        records = {}
        for part in parts:
            records.update(part.records)
        meta = table_metadata(decoder, calibration_set, spec, key=key, model_fingerprint=model_fingerprint,
                              world_size=world_size, extra=metadata)
        table = assemble_table(examples, records, spec, metadata=meta)
        table.save(out_path)
        for part in parts:
            part.remove()
    dist.barrier()
    return SweepResult(table=table, path=out_path, resumed_examples=resumed,
                       decoded_examples=decoded, seconds=seconds)
