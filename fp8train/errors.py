"""Errors with a contract.

``ConfigError``: a configuration, a data file or a checkpoint cannot be used. Its message is ONE line
naming the key (or file) and what is allowed; the ``fp8train`` command prints it as
``fp8train: error: <message>`` and exits with status 2, having written nothing.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration is invalid; the message is one line naming the key and what is allowed."""
