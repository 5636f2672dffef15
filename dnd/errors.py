"""Errors every layer may raise: a leaf, so that a low module (a backend's device check, a
setting's validation) can name the user's mistake without importing what sits above it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and the fix."""
