# Envoy 1.40 with txmesh's native module (docs/native.md): the official image
# plus libtxmesh.so in the dynamic-modules search path. The module is built
# for Envoy 1.40 and refuses any other Envoy at load (a clear log line, never
# a crash). It links glibc dynamically: build it on a base no newer than the
# Envoy image's (check with `ldd` in the image).
#   docker build -f docker/native.Dockerfile -t registry.example.com/txmesh/envoy:v1.40-txmesh-0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --profile native -p txmesh-native

FROM envoyproxy/envoy:v1.40.0
COPY --from=build /src/target/native/libtxmesh.so /usr/local/lib/txmesh/libtxmesh.so
# Envoy opens `dynamic_module_config: {name: txmesh}` as $ENVOY_DYNAMIC_MODULES_SEARCH_PATH/libtxmesh.so.
ENV ENVOY_DYNAMIC_MODULES_SEARCH_PATH=/usr/local/lib/txmesh
