"""Edges adapters."""
