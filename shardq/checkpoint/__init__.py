"""Checkpoints as untrusted input: safetensors headers indexed (`index`), tensors named as sources (`source`),
and transformers 5 renames and fusions applied to those names (`conversions`)."""
