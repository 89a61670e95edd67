"""Process groups, built once per run and handed to the model (torchtitan style).

    env = dist_env()                      # torchrun, srun/SLURM or a single process
    pg = init_parallel(cfg.parallel)      # torch.distributed + megatron-core TP + DeepSpeed EP groups
    model = AudioLM(model_cfg, ep_group=pg.ep_group, ...)
    deepspeed.initialize(..., mpu=pg.mpu)

Rank layout (world = tp * dp): megatron-core puts TP ranks next to each other ([0,1], [2,3] for tp=2);
data-parallel groups stride over them. DeepSpeed's EP groups split each DP group into blocks of `ep`
consecutive DP ranks; the expert-data-parallel group joins the ranks that hold the same experts.

This file holds the one mpu adapter of the project (`MegatronMPU`): DeepSpeed's `mpu` argument wants
the old Megatron-LM names (get_model_parallel_world_size ...) that megatron.core.parallel_state lacks.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.cluster.ports import job_port


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0].split("[")[0]


def dist_env() -> DistEnv:
    """Ranks from the launcher's environment: torchrun (RANK ...) first, then SLURM (srun), else 1 process."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
        job = int(e.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)),
                       e.get("MASTER_ADDR") or _slurm_master_addr(),
                       int(e.get("MASTER_PORT") or job_port(job)), "slurm")
    return DistEnv(0, 1, 0, e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "single")


def export_env(env: DistEnv) -> None:
    """DeepSpeed and torch read these names whatever the launcher was."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", str(env.world_size)))


def comm_device() -> torch.device:
    """Where small tensors for collectives live: the GPU under NCCL (it refuses CPU tensors), else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_values(values: list, op=dist.ReduceOp.SUM, group=None) -> list[float]:
    """Collective when torch.distributed is up (else no communication): `values` (floats or 0-dim
    tensors, on any device) reduced with `op` over `group`, in float64, one all-reduce; floats back, with
    one device-to-host copy."""
    device = comm_device()
    t = torch.zeros(0, dtype=torch.float64)
    if values:
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t, op=op, group=group)
    return t.cpu().tolist()


class MegatronMPU:
    """Old Megatron-LM mpu API over megatron.core.parallel_state (for DeepSpeed's `mpu=`)."""

    def __init__(self):
        from megatron.core import parallel_state as ps
        self.ps = ps

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_world_size(self):
        return 1


@dataclass
class ParallelGroups:
    env: DistEnv
    tp: int
    ep: int
    dp: int
    tp_rank: int
    dp_rank: int
    ep_rank: int
    ep_group: object | None  # torch ProcessGroup of this rank's EP group, None when ep == 1
    dp_group: object | None  # data-parallel group (None = world when tp == 1)
    mpu: MegatronMPU | None  # for deepspeed.initialize(mpu=...) when tp > 1

    @property
    def ep_group_name(self) -> str:
        return f"ep_size_{self.ep}"

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def all_reduce(self, values: list[float], op=dist.ReduceOp.SUM, group=None) -> list[float]:
        """all_reduce_values, handed to the rooms below the cluster with the groups (training.checkpoint
        saves with it and imports nothing from here)."""
        return all_reduce_values(values, op, group)


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The GPU a task uses among the `visible` ones it sees: LOCAL_RANK mod visible. One task per node
    seeing all GPUs: its local rank; per-task binding (`--gpus-per-task=1`, `--gpu-bind`, CUDA_VISIBLE_DEVICES
    of one device): device 0 whatever its local rank."""
    if visible < 1:
        raise ValueError("cuda_device_index: no visible GPU")
    return local_rank % visible


def nccl_error_handling_env() -> None:
    """Tear the process group down on a collective error or timeout (torch's name since 2.2; the old
    NCCL_ASYNC_ERROR_HANDLING is deprecated): one failed rank must end the job, not hang it."""
    old = os.environ.pop("NCCL_ASYNC_ERROR_HANDLING", None)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", old or "1")


def use_tf32(precision: str) -> bool:
    """fp32 training on CUDA runs its matmuls and convolutions in TF32 (what the planner and the MFU
    estimate assume: half the bf16 peak; plain fp32 is ~7x slower on Hopper). Returns whether it is on."""
    on = precision == "fp32" and torch.cuda.is_available()
    if on:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return on


def cpu_accelerator() -> bool:
    """DeepSpeed was told to use its CPU accelerator (DS_ACCELERATOR=cpu): the processes stay on the CPU and
    gloo, even where a GPU is visible (the CPU test suite on a GPU machine)."""
    return os.environ.get("DS_ACCELERATOR") == "cpu"


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and not cpu_accelerator() else "gloo"


def init_parallel(pcfg, env: DistEnv | None = None, timeout_s: float = 1800) -> ParallelGroups:
    """Start torch.distributed (via DeepSpeed's comm), megatron-core TP groups and DeepSpeed EP groups."""
    import deepspeed
    from deepspeed.utils import groups

    env = env or dist_env()
    export_env(env)
    if torch.cuda.is_available() and not cpu_accelerator():
        device = cuda_device_index(env.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
        os.environ["LOCAL_RANK"] = str(device)  # DeepSpeed's engine puts itself on cuda:LOCAL_RANK
    nccl_error_handling_env()
    backend = pcfg.backend or default_backend()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   rank=env.rank, world_size=env.world_size, auto_mpi_discovery=False)
    tp, ep = pcfg.tp, pcfg.ep
    dp = env.world_size // tp
    mpu = None
    tp_rank, dp_rank, dp_group = 0, env.rank, None
    if tp > 1:
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        mpu = MegatronMPU()
        tp_rank, dp_rank = mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank()
        dp_group = mpu.get_data_parallel_group()
    ep_group, ep_rank = None, 0
    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        if mpu is not None:
            groups.mpu = mpu
            groups._create_expert_data_and_model_parallel(ep, mpu)
            # that call records TP as the experts' tensor-parallel size; ours are whole on every TP rank
            # (MoELayer.enable_expert_tensor_parallelism False): with it DeepSpeed's norm (bf16 optimizer)
            # sums the expert gradients' norm over TP, counting them TP times
            groups.expert_tensor_parallel_world_size = 1
        else:
            groups._create_expert_and_data_parallel(ep)
    if ep > 1:
        ep_group = groups._get_expert_parallel_group(name)
        ep_rank = groups._get_expert_parallel_rank(name)
    return ParallelGroups(env, tp, ep, dp, tp_rank, dp_rank, ep_rank, ep_group, dp_group, mpu)


def shutdown() -> None:
    """Barrier before destroy: a rank that leaves right after collectives can abort its peers."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
