"""Stage 3, run: the dispatcher that executes forwards across GPUs, CPU and disk (`dispatch`), and the weight
stores and streamer of offloaded blocks (`offload`)."""
