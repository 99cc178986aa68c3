"""Integrations with the frameworks around a pool: Celery (`celery`) and Prometheus (`prometheus`)."""
