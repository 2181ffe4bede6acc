"""Pipeline stages over torch.distributed: the multi-rank plan (`plan_ranks`), stage loading (`Pipeline`, the
`distributed=` option of `load_sharded`), the pipeline runtime and its cost model."""

from shardq.distributed.comm import RemoteError
from shardq.distributed.launch import Pipeline
from shardq.distributed.stages import RankPlan, format_rank_plan, plan_ranks

__all__ = ["Pipeline", "RankPlan", "RemoteError", "format_rank_plan", "plan_ranks"]
