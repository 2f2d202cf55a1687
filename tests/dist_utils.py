"""Multi-process gloo runs under pytest (see ``fp8train._gloo_spawn``)."""

from fp8train._gloo_spawn import run_on_gloo as run_workers

__all__ = ["run_workers"]
