"""GPU presets of the planner (`unimoe plan --gpu`, a config's `cluster.gpu`): datasheet numbers of the SXM
parts (dense bf16, HBM, NVLink per direction) and one 200/400 Gbit/s NIC per GPU as in DGX/HGX nodes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Hardware:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak per GPU (no sparsity)
    hbm_tbps: float  # HBM bandwidth, TB/s
    intra_node_gbps: float  # NVLink per GPU per direction, Gbit/s
    inter_node_gbps: float  # per GPU (its share of the node's NICs), Gbit/s
    gpus_per_node: int = 8


GPUS = {
    "A100-80G": Hardware("A100-80G", 80.0, 312.0, 2.039, 2400.0, 200.0),
    "H100-80G": Hardware("H100-80G", 80.0, 989.0, 3.35, 3600.0, 400.0),
    "H200": Hardware("H200", 141e9 / 2**30, 989.0, 4.8, 3600.0, 400.0),
}


def gpu_preset_name(name: str) -> str:
    """The preset's own spelling of `name`, in any case (`h100-80g` -> `H100-80G`); ValueError naming the
    presets when there is none."""
    found = {k.lower(): k for k in GPUS}.get(str(name).strip().lower())
    if found is None:
        raise ValueError(f"unknown GPU {name!r}; presets: {', '.join(GPUS)}")
    return found


def device_preset(device: str) -> str | None:
    """The preset a device name belongs to (torch.cuda.get_device_name(), e.g. 'NVIDIA H100 80GB HBM3'
    -> 'H100-80G'); None for 'cpu' or a GPU without a preset."""
    text = device.upper().replace(" ", "")
    for name in GPUS:
        if name.split("-")[0] in text and not (name == "H200" and "GH200" in text):
            return name
    return None
