FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams streams
COPY geofencing geofencing
COPY channels channels
COPY templates templates
COPY ops ops
COPY data data
RUN pip install --no-cache-dir -e .
USER nobody
CMD ["tocsin", "worker"]
