# tofu-qemu: the state backend, the API and the controller, with QEMU, in one image.
#
# Build it with hack/build-image: it builds the wheels on the host (pip inside a build cannot
# reach an index behind TLS interception), provides the base when no registry is reachable,
# and runs `podman build --pull=never --format docker`. Run it as docs/deploy.md shows:
#   podman run --device /dev/kvm -v tofu-qemu:/var/lib/tofu-qemu -p 8080:8080 \
#     -p 127.0.0.1:20000-20099:20000-20099 -e TOFU_QEMU_PORT_RANGE=20000-20099 \
#     -e TOFU_QEMU_USERS=alice:... IMAGE
#
# BASE is any Debian bookworm image with Python 3.11 and the venv module: the official
# python:3.11-slim-bookworm (python3 in /usr/local/bin) or a debootstrap of bookworm with
# python3-venv (python3 in /usr/bin). Nothing below names the interpreter's path.
ARG BASE=python:3.11-slim-bookworm

# ---- builder: the venv, from prebuilt wheels only ------------------------------------------
FROM ${BASE} AS builder
# Built on the host by hack/build-image: the project and every dependency as wheels.
COPY .cache/image/wheels /tmp/wheels
# The venv's pip and setuptools are removed once the project is in: the final image installs
# nothing at run time.
RUN python3 -m venv /opt/tofu-qemu \
    && /opt/tofu-qemu/bin/python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels tofu-qemu \
    && /opt/tofu-qemu/bin/python -m pip uninstall --yes pip setuptools \
    && /opt/tofu-qemu/bin/tofu-qemu serve --help >/dev/null

# ---- the image -----------------------------------------------------------------------------
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# Unpinned on purpose: the versions come from the base's bookworm sources, and a rebuild should
# pick up Debian's security updates rather than fail on a version the mirror dropped.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends qemu-system-x86 qemu-utils ovmf swtpm passt \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid so a bind-mounted data dir can be chowned to it (chown 10001:10001 DIR).
# /dev/kvm is opened through a supplementary group: `--group-add $(stat -c %g /dev/kvm)`.
RUN groupadd --system --gid 10001 tofu \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tofu-qemu --no-create-home \
        --shell /usr/sbin/nologin tofu \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/tofu-qemu

COPY --from=builder /opt/tofu-qemu /opt/tofu-qemu

# Settings are TOFU_QEMU_<NAME> (tofu-qemu serve --help). Credentials are never baked in:
# pass TOFU_QEMU_USERS, TOFU_QEMU_TOKENS or TOFU_QEMU_USERS_FILE at run time.
#   FORWARD_ADDRESS    VM port forwards bind every address of the container, so -p can publish them
#   STOP_VMS_ON_EXIT   every QEMU dies with the container: power guests down gracefully on SIGTERM
#   SHUTDOWN_TIMEOUT_SECONDS  within `docker stop`'s default 10 s; guests still running then are
#                      killed by the server, as its own stop (raise it with --stop-timeout)
ENV PATH=/opt/tofu-qemu/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOFU_QEMU_DATA_DIR=/var/lib/tofu-qemu \
    TOFU_QEMU_LISTEN=0.0.0.0:8080 \
    TOFU_QEMU_LOG_FORMAT=json \
    TOFU_QEMU_FORWARD_ADDRESS=0.0.0.0 \
    TOFU_QEMU_STOP_VMS_ON_EXIT=true \
    TOFU_QEMU_SHUTDOWN_TIMEOUT_SECONDS=8

VOLUME ["/var/lib/tofu-qemu"]
EXPOSE 8080
USER 10001:10001
WORKDIR /var/lib/tofu-qemu

# The image has no curl: the venv's Python asks /readyz on the port TOFU_QEMU_LISTEN names,
# without proxies, over HTTPS (unverified: it is the server asking itself) when TLS is on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/tofu-qemu/bin/python", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('TOFU_QEMU_TLS_CERT')); port = os.environ.get('TOFU_QEMU_LISTEN', ':8080').rsplit(':', 1)[1]; o = u.build_opener(u.ProxyHandler({}), u.HTTPSHandler(context=ssl._create_unverified_context())); o.open(('https' if tls else 'http') + '://127.0.0.1:' + port + '/readyz', timeout=4)"]

# The server handles SIGTERM itself (it runs as PID 1 and installs its own handler): it drains
# reconciles, powers the VMs down (STOP_VMS_ON_EXIT) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/tofu-qemu/bin/tofu-qemu"]
CMD ["serve"]
