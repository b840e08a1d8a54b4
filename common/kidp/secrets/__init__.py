"""Secrets adapters."""
