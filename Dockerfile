# Build stage: compile wheels with the build tools; none of them reach the final image.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY connector ./connector
COPY plugins ./plugins
COPY templates ./templates
RUN python -m venv /opt/connector && /opt/connector/bin/pip install --no-cache-dir .

# Final stage: the virtual environment and a non-root user, nothing else.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /srv/connector connector \
    && mkdir -p /srv/connector/data && chown -R connector /srv/connector
COPY --from=build /opt/connector /opt/connector
ENV PATH=/opt/connector/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /srv/connector
USER connector
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health').status != 200)"
# Mount config.toml at /srv/connector/config.toml; secrets come from the environment.
CMD ["connector", "serve", "--config", "/srv/connector/config.toml", "--host", "0.0.0.0"]
