# ELB's image: `docker build -t elb .` (BuildKit, Docker 23 or later, or
# podman). scripts/image-check builds the final stage exactly as written
# here, with the build stage's /out made on the host the same way, and
# checks the result.

# Build stage: etcd-client's build script needs protoc.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libcap2-bin \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The release profile keeps debug info for profiling on a host; the image
# does without it (41 MB -> 10 MB). The file capability lets a user other
# than root bind port 80, as the original's `docker run --net host` expects,
# and nothing else.
RUN cargo build --release --locked --bin elb \
    && mkdir /out \
    && strip -o /out/elb target/release/elb \
    && setcap cap_net_bind_service=+ep /out/elb \
    && cp /etc/ssl/certs/ca-certificates.crt /out/

FROM debian:bookworm-slim
# One layer: the binary is copied in with its capability (COPY between
# stages may drop it, and a setcap in a later layer would store the binary
# twice), the CA bundle the Kubernetes source's TLS needs outside a
# cluster, and a user of its own.
RUN --mount=type=bind,from=build,source=/out,target=/out \
    cp --preserve=mode,timestamps,xattr /out/elb /usr/local/bin/elb \
    && mkdir -p /etc/ssl/certs \
    && cp /out/ca-certificates.crt /etc/ssl/certs/ \
    && useradd --system --no-log-init --user-group --uid 10001 \
         --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin elb
USER elb
# The original's `docker run` line sets ETCD, ELBNAME and STATSD; every
# other setting has its ELB_* variable. The health check asks the admin API
# named by ELB_ADMIN (default 127.0.0.1:8081), so set it there, not with
# --admin.
ENV ETCD=127.0.0.1:2379 \
    ELBNAME=ELB \
    ELB_LISTEN=0.0.0.0:80
EXPOSE 80
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/elb", "--probe"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/elb"]
