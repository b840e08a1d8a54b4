"""Rate limiters shared by every replica (``RateLimiter`` adapters).

The in-process limiter is :class:`kidp.limits.InMemoryRateLimiter`; adapters
here keep the counters outside the process so one limit holds across replicas.
"""
