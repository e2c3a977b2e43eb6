# herder as PID 1 of a small image: herder binds the port, supervises a pool of workers, reaps
# orphans, drains on `docker stop` and answers health probes. The final image is `FROM scratch`:
# two static (musl) binaries, a minimal /etc/passwd and /etc/group (so `--user nobody` resolves),
# and nothing else — no shell, no libc, no package manager.
#
#   docker build -t herder .                     # the path a user runs: builds from this checkout
#   docker run --rm -p 8080:8080 -p 8081:8081 herder
#   curl localhost:8080/            # pid=<worker pid> slot=<n>
#   curl localhost:8081/status      # herder's view of the pool (JSON)
#
# Your own worker: build FROM this image (or copy /usr/local/bin/herder into yours) and replace
# CMD, e.g. `CMD ["--workers", "4", "--", "/app/server"]`. ENTRYPOINT holds only the two sockets
# herder owns; everything after it is yours.
#
# CI (no registry to pull the Rust image from) builds the same final image from host-built static
# binaries instead:
#   docker build --target prebuilt --build-arg BIN_DIR=path/in/context .
# where BIN_DIR holds `herder` and `herder-demo` linked statically. The `build` stage is then
# skipped (BuildKit and buildah skip stages the target does not need).

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm

# ---- build: herder and herder-demo, static, from this checkout --------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# musl gives a fully static binary that reads /etc/passwd itself (glibc's static getpwnam needs
# NSS modules that a scratch image does not have). Pure-Rust dependencies: no musl-gcc needed.
RUN rustup target add "$(uname -m)-unknown-linux-musl"
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked --bins --target "$target" \
 && mkdir -p /out \
 && cp "target/$target/release/herder" "target/$target/release/herder-demo" /out/

# ---- base: everything of the final image except the binaries ----------------------------------
FROM scratch AS base
COPY packaging/container/passwd packaging/container/group /etc/
# Ports: the service (shared by all workers) and herder's health endpoint.
EXPOSE 8080 8081
# TERM drains (after --shutdown-delay); a second TERM or QUIT stops at once; HUP rolls the pool.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/herder", "--listen", "0.0.0.0:8080", "--health", "0.0.0.0:8081"]
# The example worker. --drain-timeout 8s fits `docker stop`'s default 10 s grace period.
CMD ["--drain-timeout", "8s", "--", "/usr/local/bin/herder-demo"]

# ---- prebuilt: the final image from binaries built outside (CI) -------------------------------
FROM base AS prebuilt
ARG BIN_DIR=.
COPY ${BIN_DIR}/herder ${BIN_DIR}/herder-demo /usr/local/bin/

# ---- default: the final image built from source ------------------------------------------------
FROM base AS image
COPY --from=build /out/herder /out/herder-demo /usr/local/bin/
