"""The pipeline's cost model: a `RankPlan`, per-block times and link rates give a forward's wall time for N ranks
and M micro-batches, hence time to first token and tokens/s.

GPipe fill-drain (inference: forward only): each stage and each link is a resource that one micro-batch holds for
its time; the first micro-batch crosses all of them, then the slowest one paces the other M - 1:
    T = sum(stage_i + link_i) + (M - 1) * max(stage_i, link_i)
A stage's time for a micro-batch of n tokens is the skeleton every rank runs (masks, rotary tables: `overhead`)
plus its blocks' times; a block's time is affine in n (`BlockTime`), from measurements (`bench/bench_pipeline.py`
times each block with hooks in one process) or, for hardware not at hand, from a roofline (`roofline_time`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shardq.distributed.stages import RankPlan


@dataclass(frozen=True)
class BlockTime:
    """Seconds of one block for a micro-batch of n tokens: fixed + per_token * n."""

    fixed: float
    per_token: float = 0.0

    def __call__(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    @staticmethod
    def fit(n1: int, t1: float, n2: int, t2: float) -> BlockTime:
        """The affine time through two measurements (token counts n1 < n2)."""
        slope = max(0.0, (t2 - t1) / (n2 - n1))
        return BlockTime(max(0.0, t1 - slope * n1), slope)


@dataclass(frozen=True)
class Link:
    """A link between two ranks: rate in GB/s (1e9 bytes) and latency per message in seconds."""

    gbps: float
    latency: float = 0.0

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / (self.gbps * 1e9)


@dataclass
class Prediction:
    """A forward's predicted time and what it is made of."""

    seconds: float
    stage_seconds: list[float]
    link_seconds: list[float]
    micro_batches: int
    bottleneck: str = ""
    notes: list[str] = field(default_factory=list)


def pipeline_seconds(
    stages: Sequence[float], links: Sequence[float], micro_batches: int, processors: Sequence[int] | None = None
) -> float:
    """GPipe fill-drain time of `micro_batches` equal micro-batches through `stages` joined by `links`.
    `processors[r]` names the processor running stage r when several stages share one (more ranks than cores):
    the pace is then the busiest processor's summed stage times."""
    busy: dict[int, float] = {}
    for r, t in enumerate(stages):
        key = processors[r] if processors is not None else r
        busy[key] = busy.get(key, 0.0) + t
    return sum(stages) + sum(links) + (micro_batches - 1) * max(list(busy.values()) + list(links))


def predict(
    rp: RankPlan,
    times: Mapping[str, BlockTime],
    links: Sequence[Link],
    *,
    batch: int,
    tokens: int,
    micro_batches: int = 1,
    overhead: BlockTime = BlockTime(0.0),
    logits_positions: int = 1,
    processors: Sequence[int] | None = None,
) -> Prediction:
    """Time of one forward of `batch` sequences of `tokens` new tokens each, cut into `micro_batches`.

    `times`: per unit (blocks, embeddings, head; missing units cost nothing); `links[r]`: rank r -> r+1, the last
    one back to rank 0 (the logits of `logits_positions` positions per sequence); `processors`: see
    `pipeline_seconds`."""
    if len(links) != rp.world_size:
        raise ValueError(f"give {rp.world_size} links (rank r -> r+1 and the last rank -> 0), got {len(links)}")
    m = max(1, min(micro_batches, batch))
    n = tokens * batch / m  # tokens of one micro-batch
    stage_s = [overhead(int(n)) + sum(times[u](int(n)) for u in st.owned if u in times) for st in rp.stages]
    hidden = rp.link_bytes_per_token * n
    logits = rp.logits_bytes_per_token * logits_positions * batch / m
    link_s = [lk.seconds(hidden) for lk in links[:-1]] + [links[-1].seconds(logits)]
    seconds = pipeline_seconds(stage_s, link_s, m, processors)
    hops = [f"stage {r}" for r in range(len(stage_s))] + [f"link {r}" for r in range(len(link_s))]
    slowest = max(range(len(hops)), key=lambda i: (stage_s + link_s)[i])
    return Prediction(seconds, stage_s, link_s, m, hops[slowest])


def roofline_time(params: int, nbytes: int, mem_gbps: float, tflops: float, fixed: float = 0.0) -> BlockTime:
    """A block on an accelerator: reading its weights (`nbytes` at `mem_gbps`) bounds small micro-batches, its
    matmuls (2 * params flops per token at `tflops`) large ones: `fixed` + the larger of the two."""
    read = nbytes / (mem_gbps * 1e9)
    per_token = 2 * params / (tflops * 1e12)
    return RooflineTime(fixed + read, per_token, fixed)


@dataclass(frozen=True)
class RooflineTime(BlockTime):
    """max(`fixed`, `base` + per_token * n): weight reads (in `fixed`) or compute, whichever is longer."""

    base: float = 0.0

    def __call__(self, tokens: int) -> float:
        return max(self.fixed, self.base + self.per_token * tokens)


def decode_tokens_per_s(pred: Prediction, batch: int) -> float:
    """Tokens/s of a decode step (one new token per sequence) predicted as `pred`."""
    return batch / pred.seconds
