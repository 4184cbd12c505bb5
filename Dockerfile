FROM python:3.11-slim
WORKDIR /opt/qalign
COPY pyproject.toml README.md ./
COPY qalign ./qalign
COPY migrations ./migrations
RUN pip install --no-cache-dir .
ENTRYPOINT []
