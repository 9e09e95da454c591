"""The ``moshi-mlx`` command line and terminal app (installed as ``moshi_mlx.app``)."""
