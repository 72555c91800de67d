# One image for the API, the migration and the Celery workers; docker-compose.yml gives each its command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A non-root user; it owns the artifacts folder, so a fresh named volume mounted there starts out writable.
RUN groupadd --system --gid 10001 darts \
    && useradd --system --uid 10001 --gid darts --create-home --home-dir /home/darts darts \
    && mkdir -p /var/lib/darts \
    && chown darts:darts /var/lib/darts

WORKDIR /app

# The dependencies first, from pyproject's own list, so that a code change does not reinstall them.
# torch==2.13.0 is the CPU build on the project's development machines, but here (linux x86_64, PyPI) it
# resolves to the CUDA build with its nvidia-* wheels: what the GPU workers need; the host only needs the
# NVIDIA driver and container toolkit.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code, then the project itself, editable: `service` and `worker` are imported from /app, next to
# migrations/ and alembic.ini, which is where service.db looks for the migrations.
COPY alembic.ini ./
COPY migrations/ migrations/
COPY service/ service/
COPY worker/ worker/
RUN pip install --no-deps --editable .

USER 10001:10001
EXPOSE 8000
CMD ["uvicorn", "--factory", "service.app:create_app", "--host", "0.0.0.0", "--port", "8000"]
