"""Celery workers: the app, the step task, and `advance` (the step of a stored chain)."""
