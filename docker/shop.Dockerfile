# The shop services (one image, the service is the first argument).
#   docker build -f docker/shop.Dockerfile -t txmesh/shop:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p txmesh-shop --bin shop --bin shop-demo

FROM debian:bookworm-slim
COPY --from=build /src/target/release/shop /usr/local/bin/shop
COPY --from=build /src/target/release/shop-demo /usr/local/bin/shop-demo
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/shop"]
