# agent-egress gate as a standalone service: `egress serve` for sandbox containers that use HTTP(S)_PROXY.
# Scale it out as replicas behind your orchestrator's Service (see deploy/); it keeps no shared state.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EGRESS_PRESETS_DIR=/app/allowlists

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY proxy ./proxy
COPY addons ./addons
COPY allowlists ./allowlists

RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent egress \
    && mkdir -p /var/lib/egress && chown egress /var/lib/egress

USER 10001
# 3128: the proxy sandboxes use. 9464: Prometheus /metrics (publish it only to the monitoring network).
EXPOSE 3128 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 3128), 2).close()"]
ENTRYPOINT ["egress", "serve"]
CMD ["--listen", "0.0.0.0:3128", "--metrics", "0.0.0.0:9464", "--journal", "/var/lib/egress/audit.jsonl"]
