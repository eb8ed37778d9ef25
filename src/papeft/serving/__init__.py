"""Multi-tenant serving: one frozen backbone, many tiny adapters, one mixed batch (engine.py); requests
arriving over time join and leave a running batch (continuous.py), served over HTTP (api.py, __main__.py)."""
from papeft.serving.engine import MultiTenantEngine, Request, Result
from papeft.serving.tenants import Tenant, TenantError, load_tenant
from papeft.serving.continuous import ContinuousBatcher, Job, QueueFull

__all__ = ["ContinuousBatcher", "Job", "MultiTenantEngine", "QueueFull", "Request", "Result", "Tenant", "TenantError",
           "load_tenant"]
