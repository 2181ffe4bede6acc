"""Stage 1, plan: where every block goes and what it costs, before any weight is read.

`units` cuts a model into blocks, `devicemap` reads explicit accelerate-format maps, `runmode` decides how a
CPU-placed block runs, `planner` places blocks under the caps, `placement` is the resulting `Plan`, and `report`
prints it; `reserves` sizes generation's KV cache and LoRA training's memory (`Training`).
"""

from shardq.planning.placement import Training

__all__ = ["Training"]
