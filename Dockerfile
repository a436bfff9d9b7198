# The console's map library from the npm registry (no CDN at run time), then the app.
FROM node:20-slim AS console
WORKDIR /console
COPY ops/console/package.json ops/console/package-lock.json ops/console/vendor.mjs ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams streams
COPY geofencing geofencing
COPY channels channels
COPY templates templates
COPY ops ops
COPY data data
COPY --from=console /console/static/vendor ops/console/static/vendor
RUN pip install --no-cache-dir -e .
# numba kernels compiled at build time, not on a worker's first alert
RUN python -m geofencing.warm
USER nobody
CMD ["tocsin", "worker"]
