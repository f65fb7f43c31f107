# A txmesh filter as an OCI image Istio pulls (`url: oci://...` in a WasmPlugin):
# FROM scratch, one layer holding plugin.wasm (Istio's "compat" image layout).
#   make build
#   docker build -f docker/wasm.Dockerfile --build-arg FILTER=txmesh_txn -t registry.example.com/txmesh/txmesh_txn:0.1.0 .
FROM scratch
ARG FILTER
COPY target/wasm32-wasip1/release/${FILTER}.wasm ./plugin.wasm
