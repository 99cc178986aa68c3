"""`greenpool.celery`: the Celery integration (see `greenpool.integrations.celery`)."""

from __future__ import annotations

from .integrations.celery import Integration, setup

__all__ = ["Integration", "setup"]
