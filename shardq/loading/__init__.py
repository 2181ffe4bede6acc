"""Stage 2, load: stream a checkpoint's tensors into the planned devices, quantizing on the way (`loader`)."""
