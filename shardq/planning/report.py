"""A plan as a terminal table: one row per block (runs of identical layers folded), then per-device totals."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardq.memory import DeviceKey, device_label, format_size
from shardq.planning.placement import DISK_GBPS, PCIE_GBPS, Placement, Plan

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class _Row:
    name: str
    device: DeviceKey
    run: str
    storage: str
    nbytes: int
    reason: str = ""
    count: int = 1
    stem: str | None = None
    start: int = 0
    each: int = 0

    def extends(self, p: Placement) -> bool:
        """True if `p` is the next numbered block of this row's run, with the same device, mode, reason, storage
        and size."""
        m = _INDEXED.match(p.name)
        return (
            m is not None
            and self.stem == m.group(1)
            and int(m.group(2)) == self.start + self.count
            and (self.device, self.run, self.reason, self.storage, self.each)
            == (p.device, p.run, p.reason, p.quant, p.nbytes)
        )


def _row(p: Placement) -> _Row:
    m = _INDEXED.match(p.name)
    label = f"{p.name or '(model)'} (own tensors)" if p.own_tensors_only else (p.name or "(whole model)")
    return _Row(
        label,
        p.device,
        p.run,
        p.quant,
        p.nbytes,
        p.reason,
        stem=m.group(1) if m else None,
        start=int(m.group(2)) if m else 0,
        each=p.nbytes,
    )


def _fold(placements: list[Placement]) -> list[_Row]:
    """Fold consecutive `x.N` blocks with the same device, run mode and reason, storage and size into one row."""
    rows: list[_Row] = []
    for p in placements:
        if rows and rows[-1].extends(p):
            r = rows[-1]
            r.count += 1
            r.nbytes += p.nbytes
            r.name = f"{r.stem}.{{{r.start}..{r.start + r.count - 1}}}"
        else:
            rows.append(_row(p))
    return rows


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def format_plan(plan: Plan, full: bool = False, pcie_gbps: float = PCIE_GBPS, disk_gbps: float = DISK_GBPS) -> str:
    """The plan as text: header, block table (with why each offloaded block runs as it does), device table, a
    line on what was offloaded and one on what each forward then moves (with the transfer rates assumed)."""
    q = plan.quant
    qdesc = (
        q.method + (" + double quant" if q.double_quant else "") + (", fp32 cpu offload" if q.fp32_cpu_offload else "")
    )
    out = [
        f"shardq plan of {plan.source}: {plan.dtype}, quantization {qdesc}, strategy {plan.strategy}, "
        f"workload batch {plan.workload[0]} x seq_len {plan.workload[1]} ({_mode(plan)})",
        "",
    ]
    rows = [_row(p) for p in plan.placements] if full else _fold(plan.placements)
    body = [
        [
            r.name + (f"  ({r.count} blocks)" if r.count > 1 else ""),
            device_label(r.device),
            r.run,
            r.storage,
            format_size(r.nbytes),
            _pct(r.nbytes, plan.budgets.get(r.device, 0)),
            r.reason or "-",
        ]
        for r in rows
    ]
    out += _table(["module", "device", "run", "storage", "size", "% of budget", "why"], body, {4, 5})
    out.append("")
    dev_rows = []
    for d, budget in plan.budgets.items():
        used = plan.totals.get(d, 0) + plan.reserves.get(d, 0)
        detail = ", ".join(f"{k} {format_size(v)}" for k, v in plan.reserve_detail.get(d, {}).items() if v)
        dev_rows.append(
            [
                device_label(d),
                format_size(budget),
                format_size(plan.totals.get(d, 0)),
                format_size(plan.reserves.get(d, 0)),
                format_size(plan.free(d)),
                _pct(used, budget),
                detail or "-",
            ]
        )
    out += _table(
        ["device", "budget", "weights", "reserve", "free", "used", "reserve detail"], dev_rows, {1, 2, 3, 4, 5}
    )
    out.append("")
    out.append(_summary(plan))
    cost = _cost(plan, pcie_gbps, disk_gbps)
    if cost:
        out.append(cost)
    out += [f"warning: {w}" for w in plan.warnings]
    out += [f"checkpoint mismatch: {m}" for m in plan.mismatches]
    return "\n".join(out)


def _mode(plan: Plan) -> str:
    """What the reserves are sized for: generation (KV cache, decode graphs), LoRA training, or plain forwards."""
    modes = []
    if plan.kv_cache:
        modes.append("generation: KV cache and decode graphs reserved")
    if plan.training is not None:
        t = plan.training
        targets = t.target_modules if isinstance(t.target_modules, str) else ",".join(t.target_modules)
        modes.append(f"training: LoRA rank {t.rank} on {targets}")
    return "; ".join(modes) or "forward only, no KV cache reserved"


def _summary(plan: Plan) -> str:
    """One line: total bytes, what was offloaded where and how it runs, and the execution GPU."""
    total = f"total {format_size(plan.total_bytes)} of weights in {len(plan.placements)} blocks"
    off = [p for p in plan.placements if not isinstance(p.device, int)]
    if not off:
        return f"{total}; nothing offloaded" + (
            f" (execution GPU {plan.execution_device})" if plan.execution_device is not None else ""
        )
    parts = []
    for dev in ("cpu", "disk"):
        sel = [p for p in off if p.device == dev]
        if sel:
            runs = sorted({p.run for p in sel})
            parts.append(f"{len(sel)} to {dev} ({format_size(sum(p.nbytes for p in sel))}, run: {'/'.join(runs)})")
    where = (
        f"; streamed blocks run on GPU {plan.execution_device}"
        if plan.execution_device is not None and any(p.run in ("stream", "disk") for p in off)
        else ""
    )
    return f"{total}; offloaded {', '.join(parts)}{where}"


def _cost(plan: Plan, pcie_gbps: float, disk_gbps: float) -> str:
    """One line: the bytes each forward copies to the GPU, reads from disk and computes on the CPU, and the time
    the transfers alone take at the stated rates ("" when nothing is offloaded)."""
    c = plan.forward_cost()
    if not (c.pcie_bytes or c.disk_bytes or c.cpu_bytes):
        return ""
    moved = []
    if c.pcie_bytes:
        moved.append(f"{format_size(c.pcie_bytes)} copied to GPU {plan.execution_device}")
    if c.disk_bytes:
        moved.append(f"{format_size(c.disk_bytes)} read from disk")
    line = "per forward: "
    if moved:
        rates = ([f"PCIe {pcie_gbps:g} GB/s"] if c.pcie_bytes else []) + (
            [f"disk {disk_gbps:g} GB/s"] if c.disk_bytes else []
        )
        ms = c.seconds(pcie_gbps, disk_gbps) * 1e3
        line += (
            f"{', '.join(moved)}: at least {ms:.{0 if ms >= 10 else 2}f} ms in transfers "
            f"({' and '.join(rates)} assumed; --pcie-gbps / --disk-gbps to change)"
        )
    if c.cpu_bytes:
        line += ("; " if moved else "") + f"{format_size(c.cpu_bytes)} of weights used on the CPU"
    return line
