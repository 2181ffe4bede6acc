"""Adapter training on quantized, sharded models: PEFT LoRA on shardq's layers and a kbit-training helper.

Importing `shardq.training` (which imports peft) teaches `peft.get_peft_model` shardq's `Linear4bit` and
`Linear8bit`; see `shardq.training.peft`.
"""

from shardq.training.peft import (
    QuantLoraLinear,
    linear_names,
    prepare_model_for_kbit_training,
    register_with_peft,
)

__all__ = ["QuantLoraLinear", "linear_names", "prepare_model_for_kbit_training", "register_with_peft"]
