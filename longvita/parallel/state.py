"""All parallel state in one object: world, ranks, device, the ("dp", "cp") DeviceMesh.

Owns process-group set-up and tear-down. Entry points (cli, trainer, server) build one
`ParallelState` once, with `ParallelState.init(cp=...)` under torchrun or
`ParallelState.single()` without torch.distributed, and hand it down; nothing else creates
process groups. It knows nothing about sequences or models: sharding lives in
`parallel.sharding`, ring attention in `parallel.ring_attention`.

Layout: the world is a 2-D mesh [dp, cp] in row-major order, so global rank
`dp_rank * cp_size + cp_rank`; the ranks of one context-parallel group are adjacent (same node
under torchrun), where the ring traffic is heaviest.

Timeouts: the one `timeout_s` applies to the default group and to every mesh sub-group, so a
rank that dies or stalls makes the others raise within it instead of hanging (PyTorch would
otherwise give the sub-groups its own 10/30-minute default).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

logger = logging.getLogger(__name__)

MESH_AXES = ("dp", "cp")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl", "npu": "hccl"}
"""The process-group backend of each device type (gloo for anything not listed)."""


@dataclass(frozen=True, kw_only=True)
class ParallelState:
    """Who this process is in the (data parallel x context parallel) world."""

    world_size: int
    """Number of processes in the job (dp_size * cp_size)."""
    rank: int
    """Global rank, `dp_rank * cp_size + cp_rank`."""
    cp_size: int
    """Context-parallel degree: ranks that share one packed sequence (2*cp_size zigzag chunks)."""
    cp_rank: int
    """Rank inside the context-parallel group: which pair of chunks this process holds."""
    dp_size: int
    """Data-parallel degree: independent sequences per step (world_size / cp_size)."""
    dp_rank: int
    """Rank inside the data-parallel group."""
    device: torch.device
    """The device this process computes on (accelerator:LOCAL_RANK, or cpu)."""
    mesh: DeviceMesh | None = None
    """The ("dp", "cp") DeviceMesh; None for a single process without torch.distributed."""

    def __post_init__(self) -> None:
        if self.cp_size < 1 or self.dp_size < 1:
            raise ValueError(f"cp_size {self.cp_size} and dp_size {self.dp_size} must be >= 1")
        if self.world_size != self.dp_size * self.cp_size:
            raise ValueError(
                f"world_size {self.world_size} != dp_size {self.dp_size} * cp_size {self.cp_size}"
            )
        if not (0 <= self.cp_rank < self.cp_size and 0 <= self.dp_rank < self.dp_size):
            raise ValueError(
                f"cp_rank {self.cp_rank} / dp_rank {self.dp_rank} out of range for "
                f"cp_size {self.cp_size} / dp_size {self.dp_size}"
            )
        if self.rank != self.dp_rank * self.cp_size + self.cp_rank:
            raise ValueError(
                f"rank {self.rank} != dp_rank {self.dp_rank} * cp_size {self.cp_size} + "
                f"cp_rank {self.cp_rank}"
            )
        if self.mesh is None and self.world_size != 1:
            raise ValueError(f"world_size {self.world_size} > 1 needs a DeviceMesh")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelState:
        """One process, no torch.distributed at all."""
        return cls(
            world_size=1,
            rank=0,
            cp_size=1,
            cp_rank=0,
            dp_size=1,
            dp_rank=0,
            device=torch.device(device),
        )

    @classmethod
    def init(
        cls,
        cp: int,
        *,
        backend: str | None = None,
        timeout_s: float = 600,
        device: str | torch.device | None = None,
        init_method: str = "env://",
    ) -> ParallelState:
        """Join the job once, from an entry point; returns this process's state.

        Uses an already-initialized default group if there is one, else the torchrun
        environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; `init_method`
        may name a file:// rendezvous instead of env://). Without a WORLD_SIZE and without a
        group, `cp=1` gives `single(device)`. The backend defaults to nccl on CUDA, gloo on CPU.
        Raises ValueError when the world size is not a multiple of `cp`, before any rendezvous.
        """
        if dist.is_available() and dist.is_initialized():
            if backend is not None or init_method != "env://":
                logger.warning("process group already initialized: backend, init_method ignored")
            return cls.from_group(cp, timeout_s=timeout_s, device=device)
        if "WORLD_SIZE" not in os.environ:
            _check_world(1, cp)
            return cls.single(_default_device(device, backend))
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        _check_world(world_size, cp)
        device = _default_device(device, backend)
        backend = backend or BACKENDS.get(device.type, "gloo")
        if device.type != "cpu":
            if device.index is None:
                device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
            torch.accelerator.set_device_index(device.index)
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            world_size=world_size,
            rank=rank,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type != "cpu" else None,
        )
        return cls._with_mesh(cp, backend, timeout_s, device)

    @classmethod
    def from_group(
        cls, cp: int, *, timeout_s: float = 600, device: str | torch.device | None = None
    ) -> ParallelState:
        """Build the mesh over an already-initialized default process group (tests, notebooks)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("from_group needs torch.distributed.init_process_group first")
        _check_world(dist.get_world_size(), cp)
        backend = dist.get_backend()
        device = _default_device(device, backend)
        return cls._with_mesh(cp, backend, timeout_s, device)

    @classmethod
    def _with_mesh(
        cls, cp: int, backend: str, timeout_s: float, device: torch.device
    ) -> ParallelState:
        world_size = dist.get_world_size()
        dp = world_size // cp
        mesh = init_device_mesh(
            device.type,
            (dp, cp),
            mesh_dim_names=MESH_AXES,
            # one options object per axis: torch keeps and mutates the object it is given
            backend_override={
                axis: (backend, _group_options(backend, timeout_s)) for axis in MESH_AXES
            },
        )
        state = cls(
            world_size=world_size,
            rank=dist.get_rank(),
            cp_size=cp,
            cp_rank=mesh.get_local_rank("cp"),
            dp_size=dp,
            dp_rank=mesh.get_local_rank("dp"),
            device=device,
            mesh=mesh,
        )
        # Gloo connects each axis's groups pair by pair and returns without waiting for the
        # other ranks: a rank that failed at once (a bad argument) would close its connections
        # while a peer is still making them, which that peer reports as its own failure.
        dist.barrier()
        logger.info("parallel state: %s", state.describe())
        return state

    # -- queries --------------------------------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        """True when torch.distributed groups exist (even a world of one under torchrun)."""
        return self.mesh is not None

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The ranks that share this rank's sequence (ring attention, loss all-reduce)."""
        return None if self.mesh is None else self.mesh.get_group("cp")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The ranks that hold the same chunks of different sequences (gradient reduction)."""
        return None if self.mesh is None else self.mesh.get_group("dp")

    @property
    def local_world_size(self) -> int:
        """Processes of this job on this host (torchrun's LOCAL_WORLD_SIZE, which the local
        launcher sets too; 1 without torch.distributed): they share the host's memory."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.is_distributed else 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that logs, prints and writes."""
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} (dp {self.dp_rank}/{self.dp_size}, "
            f"cp {self.cp_rank}/{self.cp_size}) on {self.device}"
        )

    def destroy(self) -> None:
        """Tear down every process group this job created; a no-op for `single()`."""
        if self.mesh is not None and dist.is_initialized():
            dist.destroy_process_group()


def _check_world(world_size: int, cp: int) -> None:
    if cp < 1:
        raise ValueError(f"--cp must be >= 1, got {cp}")
    if world_size % cp != 0:
        raise ValueError(
            f"world size {world_size} does not match --cp {cp}: the world size must be a "
            f"multiple of the context-parallel size (data parallel = world size / cp)"
        )


def _default_device(device: str | torch.device | None, backend: str | None) -> torch.device:
    """The given device, else the accelerator at LOCAL_RANK when there is one and the backend
    is not gloo, else cpu."""
    if device is not None:
        return torch.device(device)
    if backend != "gloo" and torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator().type
        return torch.device(accelerator, int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _group_options(backend: str, timeout_s: float) -> object | None:
    """Backend options that carry our timeout into the mesh's sub-groups."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo.Options(backend, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout  # the only way to hand NCCL sub-groups a timeout
        return options
    logger.warning("backend %r: mesh sub-groups keep PyTorch's default timeout", backend)
    return None
