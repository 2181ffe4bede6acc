"""What a plan is: a `Placement` per block and the `Plan` holding them with budgets, reserves and totals (and its
JSON form), plus `PlanError`. Shared by the planner, the plan table, the CLI and the loader."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from shardq.config import QuantConfig
from shardq.memory import DeviceKey
from shardq.planning.runmode import RunMode


@dataclass(frozen=True)
class Training:
    """The LoRA training a plan reserves memory for (`training=` of `plan_model` / `load_sharded`): adapters of
    `rank` on `target_modules`, PEFT's spelling: "all-linear" (every nn.Linear / Conv1D but the output head), a
    regex matched against full module names, or a list of names matched as name suffixes."""

    rank: int = 16
    target_modules: str | tuple[str, ...] = "all-linear"


class PlanError(ValueError):
    """A model that cannot be placed under the given budgets, or an invalid device map. `missing` is the
    shortfall in bytes when the budgets are too small (0 otherwise)."""

    missing: int = 0
    # set by `shortfall.refine_error` only: its `Shortfall`s (not imported here: that module imports this one)
    shortfalls: list[Any]


@dataclass
class Placement:
    """One block: its device, bytes as placed there, storage ("int8", "nf4", "fp4", "fp32", dtype), run mode and,
    for blocks off the GPUs, why it runs that way (`shardq.planning.runmode`)."""

    name: str
    device: DeviceKey
    nbytes: int
    quant: str
    run: str
    params: int
    own_tensors_only: bool = False  # the module's direct tensors; its children are placements of their own
    reason: str = ""


@dataclass
class Plan:
    """A placement of every block, with per-device budgets, reserves and totals (bytes).

    `cpu_mode` is how computing blocks placed on the CPU run unless the rule says otherwise: "cpu" (fp32,
    computed there) or "stream" (to the execution GPU); disk blocks are stored for it. Each block's own mode
    and its reason are `Placement.run`/`.reason` (`offload_modes`, `offload_reasons`): lookup blocks such as
    embeddings run "cpu" while layers stream (`shardq.planning.runmode`).
    """

    placements: list[Placement]
    device_map: dict[str, DeviceKey]
    budgets: dict[DeviceKey, int]
    reserves: dict[DeviceKey, int]
    reserve_detail: dict[DeviceKey, dict[str, int]]
    totals: dict[DeviceKey, int]
    quant: QuantConfig
    strategy: str
    execution_device: int | None
    workload: tuple[int, int]
    dtype: str
    cpu_mode: str = "stream"
    tied_groups: list[list[str]] = field(default_factory=list)
    no_split: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    source: str = ""
    offload_mode: str | dict[str, str] | None = None  # the user's forced modes, as given (validated)
    kv_cache: bool = False  # the reserves count the KV cache and decode graphs of generate() for the workload
    training: Training | None = None  # the reserves count LoRA training (adapters, checkpoints, recompute)

    @property
    def offload_modes(self) -> dict[str, str]:
        """How each block not resident on a GPU runs: "cpu", "stream" or "disk" (a `RunMode`: `.reason` says why)."""
        return {p.name: RunMode(p.run, p.reason) for p in self.placements if not isinstance(p.device, int)}

    @property
    def offload_reasons(self) -> dict[str, str]:
        """Why each block not resident on a GPU runs the way it does."""
        return {p.name: p.reason for p in self.placements if not isinstance(p.device, int)}

    def free(self, device: DeviceKey) -> int:
        """Budget left on `device` after its placed bytes and its reserve."""
        return self.budgets[device] - self.totals.get(device, 0) - self.reserves.get(device, 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.totals.values())

    def forward_cost(self) -> ForwardCost:
        """What one forward moves because of the offloading (see `ForwardCost`)."""
        gpu = self.execution_device is not None
        return ForwardCost(
            pcie_bytes=sum(p.nbytes for p in self.placements if p.run == "stream" or (gpu and p.run == "disk")),
            disk_bytes=sum(p.nbytes for p in self.placements if p.run == "disk"),
            cpu_bytes=sum(p.nbytes for p in self.placements if p.run == "cpu"),
        )

    def to_dict(self) -> dict[str, Any]:
        keyed = lambda d: {str(k): v for k, v in d.items()}  # noqa: E731  (JSON keys are strings)
        return {
            "source": self.source,
            "strategy": self.strategy,
            "dtype": self.dtype,
            "workload": list(self.workload),
            "quant": _quant_dict(self.quant),
            "execution_device": self.execution_device,
            "cpu_mode": self.cpu_mode,
            "offload_mode": self.offload_mode,
            "kv_cache": self.kv_cache,
            "training": asdict(self.training) if self.training is not None else None,
            "placements": [asdict(p) for p in self.placements],
            "device_map": dict(self.device_map),
            "offload_modes": self.offload_modes,
            "offload_reasons": self.offload_reasons,
            "budgets": keyed(self.budgets),
            "reserves": keyed(self.reserves),
            "reserve_detail": keyed(self.reserve_detail),
            "totals": keyed(self.totals),
            "free": {str(k): self.free(k) for k in self.budgets},
            "tied_groups": self.tied_groups,
            "no_split": self.no_split,
            "warnings": self.warnings,
            "mismatches": self.mismatches,
            "per_forward": asdict(self.forward_cost()),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


PCIE_GBPS = 25.0  # assumed host -> GPU rate when none is given (PCIe 4.0 x16 as measured in practice)
DISK_GBPS = 2.0  # assumed read rate of the offload folder when none is given (an NVMe SSD)


@dataclass(frozen=True)
class ForwardCost:
    """Bytes one forward moves because of the offloading: copied from the host to the execution GPU (blocks
    streamed from the CPU, and disk blocks when a GPU runs them), read back from the offload folder, and of
    weights computed on the CPU."""

    pcie_bytes: int
    disk_bytes: int
    cpu_bytes: int

    def seconds(self, pcie_gbps: float = PCIE_GBPS, disk_gbps: float = DISK_GBPS) -> float:
        """A lower bound on a forward's time from its transfers alone: streaming overlaps the disk reads, the copies
        and the compute, so the slower transfer bounds it."""
        return max(self.pcie_bytes / (pcie_gbps * 1e9), self.disk_bytes / (disk_gbps * 1e9))


def _quant_dict(q: QuantConfig) -> dict[str, Any]:
    d = asdict(q)
    d["compute_dtype"] = str(q.compute_dtype).removeprefix("torch.") if q.compute_dtype else None
    d["skip_modules"] = list(q.skip)
    return d
