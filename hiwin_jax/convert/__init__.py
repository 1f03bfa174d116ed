"""PyTorch <-> JAX checkpoint converters (declarative key tables, streaming safetensors I/O)."""
