# Builds the turbocat binary; the image runs `turbocat serve` by default.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin turbocat

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 nodejs \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/turbocat turbocat
COPY --from=build /src/target/release/turbocat /usr/local/bin/turbocat
USER turbocat
EXPOSE 8080
ENV TURBOCAT_LISTEN=0.0.0.0:8080
ENTRYPOINT ["turbocat"]
CMD ["serve"]
