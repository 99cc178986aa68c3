"""Integrations with the frameworks around a pool: Celery and Prometheus land here next."""
