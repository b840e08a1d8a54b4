"""Providers adapters."""
