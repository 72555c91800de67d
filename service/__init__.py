"""The job service: FastAPI routes, settings, database models and the queue client. Never imports torch."""
