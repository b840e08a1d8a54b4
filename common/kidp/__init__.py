"""KIDP deployment broker: one core, thin edges per cloud."""

__version__ = "0.1.0"
