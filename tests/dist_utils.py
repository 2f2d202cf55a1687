"""Multi-process gloo runs under pytest (see ``gloo_spawn``)."""

from gloo_spawn import run_on_gloo as run_workers

__all__ = ["run_workers"]
