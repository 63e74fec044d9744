"""HTTP routes. The only layer that raises HTTPException; service errors are mapped here."""

from serving.routes.admin import router as admin_router
from serving.routes.classify import router as classify_router
from serving.routes.ops import router as ops_router
from serving.routes.shadow import router as shadow_router

__all__ = ["admin_router", "classify_router", "ops_router", "shadow_router"]
