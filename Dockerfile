# One image, three entrypoints: granary-operator, granary-csi, granary-cache (worker and node
# daemon). The chart sets each container's command.
#   docker build -t ghcr.io/granary-dev/granary:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin granary-cache --bin granary-csi --bin granary-operator \
 && install -Dm755 -t /out target/release/granary-cache target/release/granary-csi target/release/granary-operator

FROM debian:bookworm-slim
# fuse3: fusermount3 for unmounting; util-linux: mount/umount for the CSI bind mounts.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates fuse3 util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The operator runs as this user (the chart sets runAsNonRoot); the node pods run privileged.
USER 65532:65532
ENTRYPOINT []
CMD ["granary-operator", "--help"]
