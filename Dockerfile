# syntax=docker/dockerfile:1
# The bridge as a container image: built in a Rust image, run from a small distroless one as a
# non-root user. Build from the repository's top: `docker build -t fhir-pubsub .`
# Settings come from FHIRPUBSUB_* variables (or mount a file and run `run --config /path`).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The manifest names the benchmark target, so cargo wants its file too.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
COPY migrations migrations
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fhir-pubsub \
    && cp target/release/fhir-pubsub /usr/local/bin/fhir-pubsub \
    && mkdir -p /empty/data

# glibc, libgcc and the CA certificates (TLS to the broker and the database), nothing else; the
# `nonroot` variant runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/fhir-pubsub /usr/local/bin/fhir-pubsub
# The default SQLite store lives in ./data: make it the user's, so a volume mounted there is too.
COPY --from=build --chown=65532:65532 /empty/data /home/nonroot/data
WORKDIR /home/nonroot
USER 65532:65532
# In a container the endpoints must be reachable from outside it (publish the port to 127.0.0.1).
ENV FHIRPUBSUB_Http__Listen=0.0.0.0:8080
EXPOSE 8080
VOLUME ["/home/nonroot/data"]
# SIGTERM (docker stop) lets the commands in flight finish (Shutdown.TimeoutSeconds, 30 s) and the
# outbox drain (Shutdown.PublishTimeoutSeconds, 15 s): give it a stop timeout above their sum.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fhir-pubsub"]
CMD ["run"]
