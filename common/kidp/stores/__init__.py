"""Stores adapters."""
