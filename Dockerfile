# syntax=docker/dockerfile:1.7
#
# keyproxy container image.
#
#   docker build -t keyproxy:0.1.0 .
#       -> runtime image: static binary on distroless, uid 65532, ~10-20 MB
#
#   docker build --target lambda --output type=local,dest=dist .
#       -> dist/bootstrap and dist/keyproxy-rotation.zip for the
#          provided.al2023 Lambda runtime (rotation function)
#
# Build for another architecture with buildx, e.g. --platform linux/arm64.
# The binaries are built natively for the target platform against musl,
# so they are fully static.

# ---------------------------------------------------------------------------
# build: compile both binaries (keyproxy and keyproxy-rotation)
# ---------------------------------------------------------------------------
FROM rust:1-alpine AS build

# musl-dev: C headers/crt for ring's C and assembly parts; zip: Lambda bundle.
# DL3018 (pin apk versions) is ignored: these are build-only tools that never
# reach the runtime image, their versions follow the base image's Alpine
# release, and Alpine removes superseded versions, so exact pins break builds.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev zip

WORKDIR /src
COPY . .

# Registry, git and target directories are BuildKit cache mounts, so
# rebuilds only recompile what changed. Binaries are copied out of the
# cache mount inside the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/keyproxy /out/keyproxy \
    && cp target/release/keyproxy-rotation /out/bootstrap \
    && zip -X -j -9 /out/keyproxy-rotation.zip /out/bootstrap

# ---------------------------------------------------------------------------
# lambda: export-only stage for the rotation function
#   docker build --target lambda --output type=local,dest=dist .
# ---------------------------------------------------------------------------
FROM scratch AS lambda
COPY --from=build /out/bootstrap /bootstrap
COPY --from=build /out/keyproxy-rotation.zip /keyproxy-rotation.zip

# ---------------------------------------------------------------------------
# runtime (default target): the proxy sidecar
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot AS runtime

LABEL org.opencontainers.image.title="keyproxy" \
      org.opencontainers.image.description="Sidecar reverse proxy that injects API keys from AWS Secrets Manager" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/static-debian12:nonroot"

COPY --from=build --chown=0:0 --chmod=0555 /out/keyproxy /usr/local/bin/keyproxy

# The distroless "nonroot" user; numeric so runAsNonRoot can verify it.
USER 65532:65532

# No EXPOSE: keyproxy listens on 127.0.0.1:8080 (app traffic) and
# 127.0.0.1:9901 (admin: /healthz, /readyz, /metrics) inside the shared
# network namespace of the pod or task; nothing is published.

# The image has no shell or curl: the binary checks its own admin endpoint.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/keyproxy", "health"]

ENTRYPOINT ["/usr/local/bin/keyproxy"]
