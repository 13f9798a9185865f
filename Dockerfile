# herald: a Matrix push gateway.
#
#   docker build -t herald .
#   docker run --rm -p 5000:5000 -p 9102:9102 herald
#
# The image ships the repository's gateway.yaml, which needs no credentials (a `log` app).
# For real providers, mount a config over it and the credentials as read-only files under
# /secrets (see deploy/gateway.production.yaml, whose paths all point there):
#
#   docker run --rm -p 5000:5000 -p 9102:9102 \
#     -v "$PWD/deploy/gateway.production.yaml:/etc/herald/gateway.yaml:ro" \
#     -v "$PWD/secrets:/secrets:ro" \
#     herald
#
# Secrets (APNs .p8 signing key or .pem certificate, FCM service-account JSON) are never
# baked into the image and never passed through environment variables: mount them as files
# (a Kubernetes Secret volume at /secrets, or `docker run -v ...:/secrets:ro`).

# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /build

# 1. Dependencies only. This layer is rebuilt when Cargo.toml or Cargo.lock change, not when
#    the sources do. Cargo refuses to load a manifest whose declared targets have no file, so
#    every `[[bin]]`, `[[bench]]`, `[[test]]` and `[[example]]` gets a stub (`path = ...`, or
#    the default location for its name). Only the lib and the bins are compiled here.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && awk -F'"' ' \
        function flush() { if (dir != "" && name != "") print (path != "" ? path : dir "/" name ".rs"); dir = name = path = "" } ; \
        /^[ \t]*\[/ { flush() } ; \
        /^[ \t]*\[\[bin\]\]/ { dir = "src/bin" } ; \
        /^[ \t]*\[\[bench\]\]/ { dir = "benches" } ; \
        /^[ \t]*\[\[test\]\]/ { dir = "tests" } ; \
        /^[ \t]*\[\[example\]\]/ { dir = "examples" } ; \
        dir != "" && /^[ \t]*name[ \t]*=/ { name = $2 } ; \
        dir != "" && /^[ \t]*path[ \t]*=/ { path = $2 } ; \
        END { flush() }' Cargo.toml \
       | while read -r stub; do mkdir -p "$(dirname "$stub")" && echo 'fn main() {}' > "$stub"; done \
    && cargo build --release --locked

# 2. The real sources. COPY keeps the files' own mtimes, which can be older than the stub
#    build's outputs; touch them so cargo rebuilds herald itself (dependencies stay cached).
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked

# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------
# distroless/cc rather than debian-slim: herald is one glibc-linked binary (rustls + ring, with
# webpki roots compiled in; SQLite bundled), so all it needs is glibc + libgcc, and this image
# has exactly that: no shell, no package manager, far fewer packages to patch for CVEs.
# cc-debian12 matches the builder's bookworm glibc. The trade-off: no shell to debug with and
# no curl for a Docker HEALTHCHECK; orchestrators probe HTTP instead (Kubernetes: liveness
# `GET /health`, readiness `GET /ready`, both on the admin port 9102).
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /build/target/release/herald /usr/local/bin/herald

WORKDIR /etc/herald
# Owned by root and read-only for herald; replace it with a bind mount or a ConfigMap.
COPY gateway.yaml /etc/herald/gateway.yaml
ENV HERALD_CONFIG=/etc/herald/gateway.yaml

# A fixed numeric uid/gid (no passwd entry needed) so volume permissions and Kubernetes
# `runAsUser`/`runAsNonRoot` are predictable. Mounted secrets must be readable by 10001.
USER 10001:10001

# 5000: the notify API (/_matrix/push/v1/notify). 9102: admin (/metrics, /health, /ready).
EXPOSE 5000 9102

# herald runs as PID 1 and handles SIGTERM itself (stops accepting, drains within
# `shutdown_grace`, exits 0), so no init shim is needed.
ENTRYPOINT ["/usr/local/bin/herald"]
# The shipped gateway.yaml listens on 127.0.0.1, which is unreachable from outside a container;
# these flags override `listen` and `admin_listen` from the YAML.
CMD ["serve", "--listen", "0.0.0.0:5000", "--admin-listen", "0.0.0.0:9102"]
