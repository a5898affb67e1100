"""4D parallelism: one module per concern (mesh, tensor, context, pipeline, FSDP, clipping)."""
