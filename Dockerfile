# agent-egress gate as a standalone service: `egress serve` for sandbox containers that use HTTP(S)_PROXY.
# Scale it out as replicas behind your orchestrator's Service (see deploy/); with ask rules they share
# their approvals through Redis (--state redis://...).
#
# Runs as UID 10001 with a read-only root file system: everything it writes goes to /var/lib/egress (the
# state directory with mitmproxy's CA files, and the audit journal), which deployments mount as a volume,
# emptyDir or tmpfs.
#
# The base image is pinned by the digest of its multi-architecture index, so a rebuild gets the same bytes.
# To move to a newer patch release, resolve the tag and replace tag and digest together:
#   docker buildx imagetools inspect python:3.12.13-slim-bookworm --format '{{json .Manifest.Digest}}'
# (or `crane digest python:3.12.13-slim-bookworm`). The digest below is the one public references give for
# this tag as resolved from Docker Hub in August 2026; this repository's CI has no container engine to
# pull it, so check it the first time you build.
FROM python:3.12.13-slim-bookworm@sha256:4766d8b510c428e595d74b9cc5bbb2fae8e26316fffb4adc89908d79aacd58a2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EGRESS_PRESETS_DIR=/app/allowlists \
    EGRESS_STATE_DIR=/var/lib/egress \
    HOME=/var/lib/egress

WORKDIR /app

# Dependencies first, pinned by constraints.txt: this layer is rebuilt when the pins or the dependency
# list change, not on every source edit.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY proxy ./proxy
COPY addons ./addons
COPY allowlists ./allowlists
# The dataclasses' code table is written next to the installed modules, root-owned as their bytecode
# is (-P: the installed package, not the copy in /app): docs/startup.md.
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
    && pip check \
    && python -P -m proxy.runtime.codecache \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/egress \
       --shell /usr/sbin/nologin egress \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/egress

USER 10001:10001
VOLUME ["/var/lib/egress"]
# 3128: the proxy sandboxes use. /metrics stays on the container's loopback unless a deployment passes
# --metrics with an address only the monitoring network reaches (see deploy/). --audit-required: when the
# journal cannot be written (a full or lost volume) new connections are denied, never forwarded unrecorded.
EXPOSE 3128
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 3128), 2).close()"]
ENTRYPOINT ["egress", "serve"]
CMD ["--listen", "0.0.0.0:3128", "--metrics", "127.0.0.1:9464", "--journal", "/var/lib/egress/audit.jsonl", "--audit-required"]
