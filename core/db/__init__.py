"""Storage: typed models, the async engine and session factory, start-up migrations."""

from core.db.engine import SessionFactory, create_engine, create_session_factory, migrate
from core.db.models import Base

__all__ = ["Base", "SessionFactory", "create_engine", "create_session_factory", "migrate"]
