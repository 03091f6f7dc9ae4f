# Build stage: etcd-client's build script needs protoc.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin elb

FROM debian:bookworm-slim
COPY --from=build /src/target/release/elb /usr/local/bin/elb
# The original's `docker run` line sets ETCD, ELBNAME and STATSD; ELB listens
# on port 80 inside the image.
ENV ETCD=127.0.0.1:2379 \
    ELBNAME=ELB \
    ELB_LISTEN=0.0.0.0:80
EXPOSE 80
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/elb"]
