"""The pricing catalogue: an estimated monthly cost with seed 000's breakdown.

List prices are approximations of on-demand prices (USD, 730 hours a month)
kept in the core so every cloud is estimated the same way; they are
estimates for attribution and jump detection, not invoices.
"""

from __future__ import annotations

from typing import Any

from kidp.models import Cost, ResourceType, Size

HOURS_PER_MONTH = 730

#: Hourly compute price by provider, resource type and size.
_COMPUTE_HOURLY: dict[str, dict[ResourceType, dict[Size, float]]] = {
    "aws": {
        ResourceType.DATABASE: {
            Size.SMALL: 0.068,
            Size.MEDIUM: 0.136,
            Size.LARGE: 0.272,
            Size.XLARGE: 0.544,
        },
        ResourceType.CACHE: {
            Size.SMALL: 0.034,
            Size.MEDIUM: 0.068,
            Size.LARGE: 0.156,
            Size.XLARGE: 0.311,
        },
        ResourceType.SERVICE: {
            Size.SMALL: 0.049,
            Size.MEDIUM: 0.099,
            Size.LARGE: 0.198,
            Size.XLARGE: 0.395,
        },
    },
    # Cloud SQL Enterprise (vCPU + memory of the db-custom tier), Memorystore
    # Basic per GB-hour, Cloud Run with min instances always allocated.
    "gcp": {
        ResourceType.DATABASE: {
            Size.SMALL: 0.068,
            Size.MEDIUM: 0.111,
            Size.LARGE: 0.221,
            Size.XLARGE: 0.442,
        },
        ResourceType.CACHE: {
            Size.SMALL: 0.098,
            Size.MEDIUM: 0.196,
            Size.LARGE: 0.216,
            Size.XLARGE: 0.352,
        },
        ResourceType.SERVICE: {
            Size.SMALL: 0.079,
            Size.MEDIUM: 0.158,
            Size.LARGE: 0.317,
            Size.XLARGE: 0.634,
        },
    },
    # Azure: flexible servers (Burstable B1ms/B2s, General Purpose D2ds/D4ds v5),
    # Azure Cache for Redis Basic C1-C4 (Standard runs a replica: the HA
    # factor), Container Apps consumption (vCPU and GiB per second).
    "azure": {
        ResourceType.DATABASE: {
            Size.SMALL: 0.025,
            Size.MEDIUM: 0.07,
            Size.LARGE: 0.178,
            Size.XLARGE: 0.356,
        },
        ResourceType.CACHE: {
            Size.SMALL: 0.055,
            Size.MEDIUM: 0.11,
            Size.LARGE: 0.225,
            Size.XLARGE: 0.506,
        },
        ResourceType.SERVICE: {
            Size.SMALL: 0.108,
            Size.MEDIUM: 0.216,
            Size.LARGE: 0.432,
            Size.XLARGE: 0.864,
        },
    },
}
#: Per GB-month of provisioned storage.
_STORAGE_GB_MONTH: dict[str, dict[ResourceType, float]] = {
    "aws": {ResourceType.DATABASE: 0.115, ResourceType.BUCKET: 0.023},
    "gcp": {ResourceType.DATABASE: 0.17, ResourceType.BUCKET: 0.020},
    "azure": {ResourceType.DATABASE: 0.115, ResourceType.BUCKET: 0.0184},
}
#: Flat monthly figures for resources billed by use.
_FLAT_MONTHLY: dict[str, dict[ResourceType, float]] = {
    "aws": {ResourceType.TOPIC: 10.0, ResourceType.BUCKET: 5.0},
    "gcp": {ResourceType.TOPIC: 10.0, ResourceType.BUCKET: 5.0},
    # Service Bus Standard's base charge; blob operations.
    "azure": {ResourceType.TOPIC: 9.81, ResourceType.BUCKET: 5.0},
}
#: Network egress estimate as a share of compute.
_NETWORK_SHARE = 0.1
#: Aurora and Multi-AZ run a standby: compute counts twice.
_HA_FACTOR = 2.0


def _prices(provider: str) -> str:
    # Clouds without their own table are estimated with AWS's list prices.
    return provider if provider in _COMPUTE_HOURLY else "aws"


def estimate(provider: str, resource_type: ResourceType, spec: dict[str, Any]) -> Cost:
    """Monthly cost of ``spec`` (a wire-shaped spec: desired or actual)."""
    table = _prices(provider)
    size = Size(spec.get("size") or Size.SMALL)
    compute = 0.0
    hourly = _COMPUTE_HOURLY[table].get(resource_type)
    if hourly is not None:
        compute = hourly[size] * HOURS_PER_MONTH
        if spec.get("highAvailability"):
            compute *= _HA_FACTOR
        if resource_type is ResourceType.SERVICE:
            compute *= int(spec.get("replicas") or 1)
    compute += _FLAT_MONTHLY[table].get(resource_type, 0.0)
    storage_gb = float(spec.get("storageGb") or 0)
    storage = storage_gb * _STORAGE_GB_MONTH[table].get(resource_type, 0.0)
    if spec.get("highAvailability") and resource_type is ResourceType.DATABASE:
        storage *= _HA_FACTOR
    network = compute * _NETWORK_SHARE
    breakdown = {
        "compute": round(compute, 2),
        "storage": round(storage, 2),
        "network": round(network, 2),
    }
    return Cost(estimated_monthly=round(sum(breakdown.values()), 2), breakdown=breakdown)
