"""Checkpoint conversion to MLX model folders (installed as ``moshi_mlx.convert``)."""
