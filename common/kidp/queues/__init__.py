"""Queues adapters."""
