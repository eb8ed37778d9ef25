"""Multi-tenant serving: one frozen backbone, many tiny adapters, one mixed batch."""
from papeft.serving.engine import MultiTenantEngine, Request, Result
from papeft.serving.tenants import Tenant, TenantError, load_tenant

__all__ = ["MultiTenantEngine", "Request", "Result", "Tenant", "TenantError", "load_tenant"]
