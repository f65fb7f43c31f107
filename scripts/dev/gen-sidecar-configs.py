#!/usr/bin/env python3
# The one generator of the shop's Envoy configs: the sidecars of order,
# payment and inventory and the ingress (run from the repo root).
#
#   scripts/dev/gen-sidecar-configs.py            writes envoy/*.yaml (the committed ones)
#   scripts/dev/gen-sidecar-configs.py --host native   writes envoy/native/*.yaml: authz,
#                                                 metrics and the router from libtxmesh.so (docs/native.md)
#   scripts/dev/gen-sidecar-configs.py --check    fails (exit 1) if a committed file differs
#                                                 (envoy/ and envoy/native/)
#   scripts/dev/gen-sidecar-configs.py --out DIR --offset N --ingress-port P --certs DIR \
#       --instances payment=2,inventory=1         what scripts/shop.sh runs (`make up`)
#
# Instance k (2..9) of a participant service uses the first one's ports + 10(k-1)
# and is node "<service>-<k>" (the txn filter's node must be unique per instance).

import argparse, filecmp, os, sys, tempfile
from string import Template

ap = argparse.ArgumentParser(description="generate the shop's Envoy configs")
ap.add_argument("--out", default=None, help="default: envoy (wasm) or envoy/native (native)")
ap.add_argument("--host", choices=("wasm", "native"), default="wasm",
                help="native: authz, metrics and the router from the dynamic module libtxmesh.so")
ap.add_argument("--offset", type=int, default=0, help="added to every port")
ap.add_argument("--ingress-port", type=int, default=None, help="default: 10000 + offset")
ap.add_argument("--certs", default=".txmesh/certs")
ap.add_argument("--instances", default="", help="service=n,... (payment and inventory; default 1 each)")
ap.add_argument("--check", action="store_true", help="compare the committed envoy/*.yaml with what this writes")
ARGS = ap.parse_args()
HOST = ARGS.host
COMMITTED = "envoy/native" if HOST == "native" else "envoy"
if ARGS.out is None:
    ARGS.out = COMMITTED
OFFSET = ARGS.offset
def P(port): return port + OFFSET
INGRESS_PORT = ARGS.ingress_port if ARGS.ingress_port is not None else P(10000)
ENDPOINT = "[{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $port}}}}]}]"
def ep(port): return Template(ENDPOINT).substitute(port=P(port))
# A cluster's options for speaking HTTP/2 to its endpoints (gRPC: the OTel
# collector, a gRPC app, a route to a gRPC service).
HTTP2 = """    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"""
# The cluster of an OpenTelemetry collector every config names (tracing).
OTEL_CLUSTER = '''  # An OpenTelemetry collector (OTLP/gRPC), if you run one: Envoy's spans
  # carry the W3C trace id of the request (the txn decision log and record
  # carry it too). Nothing listens here by default: exports fail quietly.
  - name: otel_collector
    type: STATIC
    connect_timeout: 0.25s
''' + HTTP2 + '''    load_assignment:
      cluster_name: otel_collector
      endpoints: ''' + ep(4317)
SPIFFE = "spiffe://txmesh.local/ns/shop/sa/"
# The stat labels (tag, key in the stat name): txmesh_core::labels::stats_tags
# is the definition; tests/it/configs.rs checks these configs carry each one.
METRICS_TAGS = [(t, t) for t in ("reporter", "source_workload", "destination_service",
                                 "response_code", "response_flags", "request_protocol",
                                 "grpc_response_status")]
TXN_TAGS = [("outcome", "outcome"), ("reason", "reason")]
AUTHZ_TAGS = [("decision", "decision"), ("rule", "rule")]
ROUTER_TAGS = [("service", "router_service"), ("endpoint", "router_endpoint"), ("zone", "router_zone")]
def listener_head(direction, port, stat_prefix, service):
    """A listener's address and the head of its HTTP connection manager
    (OpenTelemetry tracing as `service`), the same for every listener."""
    return Template("""    traffic_direction: $direction
    address: {socket_address: {address: 127.0.0.1, port_value: $port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $stat_prefix
          tracing:
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: {envoy_grpc: {cluster_name: otel_collector}, timeout: 0.25s}
                service_name: $service""").substitute(direction=direction, port=port, stat_prefix=stat_prefix, service=service)
def stats_tags(tags):
    return "\n".join("  - {tag_name: %s, regex: '(%s=\\.=(.*?);\\.;)'}" % t for t in tags)
CERTS = ARGS.certs   # scripts/certs.sh; scripts/shop.sh passes its own under TXMESH_HOME
def upstream_tls(me, peer, indent):
    """Client side of mTLS: present `me`'s certificate, accept only `peer`'s SPIFFE id."""
    t = Template("""transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
    common_tls_context:
      tls_certificates: [{certificate_chain: {filename: $certs/$me.crt}, private_key: {filename: $certs/$me.key}}]
      validation_context:
        trusted_ca: {filename: $certs/ca.crt}
        match_typed_subject_alt_names: [{san_type: URI, matcher: {exact: "$spiffe$peer"}}]
""").substitute(certs=CERTS, me=me, peer=peer, spiffe=SPIFFE)
    return "".join(indent + l + "\n" for l in t.rstrip().split("\n"))
def authz_policy(coordinators):
    """txmesh_authz's policy for one sidecar: /txmesh/* only from the
    identities that coordinate its transactions (docs/security.md)."""
    return ('{"default": "allow", "coordinators": [' +
        ", ".join('{"exact": "%s%s"}' % (SPIFFE, n) for n in coordinators) + ']}')
# Who may call each sidecar's /txmesh/* endpoints: payment and inventory are
# enlisted by order only; nobody coordinates order (the root), whose own app
# its sidecar reaches directly.
COORDINATORS = {"order": (), "payment": ("order",), "inventory": ("order",)}
def wasm_filter(artifact, policy, value, anchor=None, why=None, block=False):
    """One txmesh wasm filter of a listener's http_filters: `artifact` is the
    module (also plugin name, root id and vm id), `value` its JSON config,
    quoted on one line or (`block`) as a YAML block scalar; `why` a comment
    above the failure policy; `anchor` a YAML anchor for the entry."""
    head = "          - %s\n            name: envoy.filters.http.wasm" % anchor if anchor \
        else "          - name: envoy.filters.http.wasm"
    why = "".join("                # %s\n" % l for l in why.split("\n")) if why else ""
    value = ("|\n" + "\n".join(" " * 20 + l for l in value.split("\n"))) if block else "'%s'" % value
    return Template("""$head
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: $artifact
                root_id: $artifact
${why}                failure_policy: $policy
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: $value
                vm_config:
                  vm_id: $artifact
                  runtime: envoy.wasm.runtime.v8
                  code: {local: {filename: target/wasm32-wasip1/release/$artifact.wasm}}""").substitute(
        head=head, artifact=artifact, why=why, policy=policy, value=value)
def native_filter(filter_name, value, anchor=None):
    """One filter of the native module libtxmesh.so (Envoy's dynamic-modules
    HTTP filter, found in $ENVOY_DYNAMIC_MODULES_SEARCH_PATH): the same JSON
    config as its wasm twin."""
    head = "          - %s\n            name: envoy.filters.http.dynamic_modules" % anchor if anchor \
        else "          - name: envoy.filters.http.dynamic_modules"
    return Template("""$head
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {name: txmesh, metrics_namespace: txmesh}
              filter_name: $filter_name
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: '$value'""").substitute(head=head, filter_name=filter_name, value=value)
def authz_filter(value):
    if HOST == "native":
        return native_filter("authz", value)
    return wasm_filter("txmesh_authz", "FAIL_CLOSED", value)
# The native module's stats are named as the wasm filters' (not
# envoy_txmesh_...): a runtime flag every native config sets.
NATIVE_RUNTIME = '''
# Native tier: authz, metrics and the router come from libtxmesh.so. Run from the
# repository root after `make build build-native`:
#   ENVOY_DYNAMIC_MODULES_SEARCH_PATH=target/native .venv/bin/envoy -c <this file> ...
# libtxmesh.so's stats without Envoy's envoy_<namespace>_ prefix (docs/native.md).
layered_runtime:
  layers:
  - name: static
    static_layer:
      envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix: true'''
# The txn and metrics filters, per listener: the direction is set in each
# configuration (it saves a lookup of the listener's direction per request).
# How each service's app takes prepare/commit/abort (docs/protocol.md): inventory
# implements txmesh.v1.Participant over gRPC, the others the HTTP endpoints.
APP_PROTOCOL = {"order": "http", "payment": "http", "inventory": "grpc"}
def txn_filter(name, begin_json, direction, anchor, app_protocol="http"):
    grpc = ', "app_protocol": "grpc"' if app_protocol == "grpc" else ""
    return wasm_filter("txmesh_txn", "FAIL_CLOSED",
        '{%s"direction": "%s", "node": "%s", "default_timeout_ms": 5000, "max_timeout_ms": 30000,\n'
        ' "max_in_flight": 1024, "app_cluster": "local_app"%s, "etcd_cluster": "etcd"}' % (begin_json, direction, name, grpc),
        anchor, "A transaction filter never fails open: without it a request\ncould run outside its transaction.", block=True)
# The cluster options of a gRPC app: HTTP/2 (its gRPC control service; HTTP/1
# business calls from the inbound listener go over it too).
APP_H2 = "    # The app speaks gRPC (txmesh.v1.Participant): HTTP/2.\n" + HTTP2
# A route cluster to a gRPC service (order calls shop.v1.Inventory): HTTP/2.
UPSTREAM_H2 = "    # %s speaks gRPC (shop.v1.Inventory): HTTP/2 to its sidecar.\n" + HTTP2
def router_filter(value):
    if HOST == "native":
        return native_filter("router", value)
    return wasm_filter("txmesh_router", "FAIL_CLOSED", value,
        why="Fails closed: without it the pick header could come from anyone.", block=True)
def metrics_filter(name, direction, anchor):
    value = '{"workload": "%s", "reporter": "%s"}' % (name, direction)
    if HOST == "native":
        return native_filter("metrics", value, anchor)
    return wasm_filter("txmesh_metrics", "FAIL_OPEN", value, anchor)
def sidecar(name, admin, inbound, outbound, app_port, routes, begin, instance=None):
    instance = instance or name
    vhosts = ""
    clusters = ""
    for (svc, port) in routes:
        vhosts += Template("""            - name: $svc
              domains: ["$svc", "$svc:*"]
              routes:
              # Control calls are never retried or hedged by Envoy: the
              # coordinator retries them itself, idempotently.
              - match: {prefix: "/txmesh/"}
                route: {cluster: $svc, timeout: 10s, retry_policy: {num_retries: 0}}
              - match: {prefix: "/"}
                route: {cluster: $svc, timeout: 15s}
""").substitute(svc=svc)
        clusters += Template("""  - name: $svc          # $svc's instances (their sidecars' inbound listeners), picked by txmesh_router
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    original_dst_lb_config: {use_http_header: true, http_header_name: x-txmesh-endpoint}
""").substitute(svc=svc) + (UPSTREAM_H2 % svc if APP_PROTOCOL[svc] == "grpc" else "") + upstream_tls(name, svc, "    ")
    begin_json = '"begin": [{"method": "POST", "path_prefix": "/checkout"}], ' if begin else ""
    role = "initiator (begins transactions on POST /checkout)" if begin else "participant"
    outbound_block = ""
    out_comment = ""
    if routes:
        out_comment = "\n#   outbound 127.0.0.1:%d -> routes by Host to %s, instances from the registry in etcd" % (P(outbound), ", ".join(r[0] for r in routes))
        outbound_block = Template("""
  - name: outbound
$listener_outbound
          route_config:
            virtual_hosts:
$vhosts
          http_filters:
          # The router first: it picks the instance (x-txmesh-endpoint), and
          # the txn filter pins the participant to it.
$router
$txn_out
$metrics_out
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
""").substitute(name=name, outbound=P(outbound), listener_outbound=listener_head("OUTBOUND", P(outbound), "outbound", name), vhosts=vhosts.rstrip(), router=router_filter(
            '{"etcd_cluster": "etcd", "poll_interval_ms": 500, "services": {%s}}' % ", ".join(
            '"%s": {"strategy": "peak_ewma", "outlier": {"consecutive_failures": 5, "base_ejection_ms": 10000}}' % r[0] for r in routes)),
            txn_out=txn_filter(instance, "", "outbound", "&txn_outbound", APP_PROTOCOL[name]),
            metrics_out=metrics_filter(name, "outbound", "&metrics_outbound"))
    return Template("""# txmesh sidecar of "$name", the $role.
#   inbound  127.0.0.1:$inbound (mTLS, SPIFFE id $spiffe$name) -> the app at 127.0.0.1:$app_port$out_comment
#   status   127.0.0.1:$status (plain, for the app: GET /txmesh/txns/<id> only)
#   admin    127.0.0.1:$admin (Prometheus: /stats/prometheus)
#   etcd     127.0.0.1:2379 (decision records, JSON gateway)
# Filters: inbound txmesh_authz, txmesh_txn (both fail closed), txmesh_metrics
# (fails open); outbound txmesh_router (fails closed), txmesh_txn, txmesh_metrics.
# Certificates: scripts/certs.sh order payment inventory ingress (into .txmesh/certs).
# Run from the repository root after `make build`:
#   .venv/bin/envoy -c envoy/$instance-sidecar.yaml --base-id $admin
node:
  id: $instance-sidecar
  cluster: $name
  metadata: {WORKLOAD_NAME: $name}

admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $admin}}

stats_config:
  stats_tags:
$stats_tags

static_resources:
  listeners:
  - name: inbound
$listener_inbound
          route_config:
            virtual_hosts:
            - name: local_app
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: local_app, timeout: 15s}
          http_filters:
          # Who may call what: /txmesh/* only from the mesh's sidecars.
$authz_filter
$txn_in
$metrics_in
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
      # mTLS: only callers with a certificate from the mesh CA get in.
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{certificate_chain: {filename: $certs/$name.crt}, private_key: {filename: $certs/$name.key}}]
            validation_context: {trusted_ca: {filename: $certs/ca.crt}}
  # For the local app only: transaction status (GET /txmesh/txns/<id>,
  # answered by the txn filter) and GET /txmesh/txns?state=... (txmeshctl), plain HTTP on loopback; nothing else.
  - name: app-status
    traffic_direction: INBOUND
    address: {socket_address: {address: 127.0.0.1, port_value: $status}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: app_status
          route_config:
            virtual_hosts:
            - name: status
              domains: ["*"]
              routes:
              - match: {prefix: "/txmesh/txns", headers: [{name: ":method", string_match: {exact: GET}}]}
                route: {cluster: local_app}
              - match: {prefix: "/"}
                direct_response: {status: 404, body: {inline_string: 'only GET /txmesh/txns and /txmesh/txns/<id> here'}}
          http_filters:
          - *txn
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
$outbound_block
  clusters:
$otel_cluster
  - name: local_app      # the app; the txn filter sends it prepare/commit/abort directly
    type: STATIC
    connect_timeout: 1s
$app_h2    load_assignment:
      cluster_name: local_app
      endpoints: $app_ep
  # etcd's JSON gateway, reached by the txn filter's callouts (never retried by
  # Envoy). With a 3-member cluster list every member: the health check takes
  # a dead member out of rotation within a second, and the filter re-sends a
  # decision write that could not connect.
  - name: etcd
    type: STATIC
    connect_timeout: 1s
    health_checks:
    - {timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: {path: /health}}
    load_assignment:
      cluster_name: etcd
      endpoints: $etcd_ep
$clusters""").substitute(listener_inbound=listener_head("INBOUND", P(inbound), "inbound", name), stats_tags=stats_tags(METRICS_TAGS + TXN_TAGS + AUTHZ_TAGS + ROUTER_TAGS), name=name, instance=instance, role=role, inbound=P(inbound), app_port=P(app_port), out_comment=out_comment,
        status=P(inbound + 2), certs=CERTS, otel_cluster=OTEL_CLUSTER, spiffe=SPIFFE, authz_filter=authz_filter(authz_policy(COORDINATORS[name])),
        admin=P(admin), begin_json=begin_json, outbound_block=outbound_block, app_ep=ep(app_port), etcd_ep=ep(2379),
        clusters=clusters.rstrip(), txn_in=txn_filter(instance, begin_json, "inbound", "&txn", APP_PROTOCOL[name]),
        app_h2=APP_H2 if APP_PROTOCOL[name] == "grpc" else "",
        metrics_in=metrics_filter(name, "inbound", "&metrics"))
OUT = tempfile.mkdtemp(prefix="txmesh-configs-") if ARGS.check else ARGS.out
os.makedirs(OUT, exist_ok=True)
def write(name, text):
    if HOST == "native":
        text = text.rstrip() + "\n" + NATIVE_RUNTIME
    with open(os.path.join(OUT, name), "w") as f:
        f.write(text.rstrip() + "\n")
INSTANCES = {"payment": 1, "inventory": 1}
for item in filter(None, ARGS.instances.split(",")):
    svc, _, n = item.partition("=")
    if svc not in INSTANCES or not n.isdigit() or not 1 <= int(n) <= 9:
        sys.exit("--instances: want payment=N or inventory=N with N in 1..9, got %r" % item)
    INSTANCES[svc] = int(n)
write("order-sidecar.yaml", sidecar("order",15000,15006,15001,18080,[("payment",15106),("inventory",15206)],True))
for svc, (admin, app) in {"payment": (15100, 18081), "inventory": (15200, 18082)}.items():
    for k in range(1, INSTANCES[svc] + 1):
        d = (k - 1) * 10
        inst = svc if k == 1 else "%s-%d" % (svc, k)
        write("%s-sidecar.yaml" % inst, sidecar(svc, admin + d, admin + 6 + d, admin + 1 + d, app + d, [], False, inst))

INGRESS = Template('''# The shop's ingress: the public API on 127.0.0.1:10000 (admin 127.0.0.1:9901).
#   POST /checkout, GET /orders/<id>  -> order's sidecar (inbound 15006)
#   GET /accounts/<customer>          -> payment's sidecar (inbound 15106)
#   GET /stock/<sku>                  -> inventory's sidecar (inbound 15206)
# Headers a client must not control are removed before anything acts on them
# (txmesh_authz in edge mode); calls to the sidecars use mTLS as "ingress".
node:
  id: ingress
  cluster: ingress
  metadata: {WORKLOAD_NAME: ingress}

admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $ingress_admin}}

stats_config:
  stats_tags:
$stats_tags

static_resources:
  listeners:
  - name: ingress
$listener_ingress
          route_config:
            # Defense in depth: txmesh_authz (edge mode) below strips these and
            # the txmesh.txn member of baggage (docs/security.md).
            request_headers_to_remove: [x-txmesh-txn, x-txmesh-outcome, x-txmesh-endpoint, x-txmesh-deadline, x-txmesh-source-workload]
            virtual_hosts:
            - name: shop
              domains: ["*"]
              routes:
              - match: {prefix: "/checkout"}
                route: {cluster: order, timeout: 30s}
              - match: {prefix: "/orders/"}
                route: {cluster: order, timeout: 10s}
              - match: {prefix: "/accounts/"}
                route: {cluster: payment, timeout: 10s}
              - match: {prefix: "/stock/"}
                route: {cluster: inventory, timeout: 10s}
          http_filters:
          # Edge sanitizing before anything else acts on the request.
$edge_authz
$ingress_metrics
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}

  clusters:
$otel_cluster
  - name: order
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: order
      endpoints: $order
$order_tls  - name: payment
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: payment
      endpoints: $payment
$payment_tls  - name: inventory
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: inventory
      endpoints: $inventory
$inventory_tls''')
write("ingress.yaml", INGRESS.substitute(
    listener_ingress=listener_head("OUTBOUND", INGRESS_PORT, "ingress", "ingress"),
    stats_tags=stats_tags(METRICS_TAGS + AUTHZ_TAGS), ingress_admin=P(9901), ingress_port=INGRESS_PORT,
    edge_authz=authz_filter('{"default": "allow", "edge": {"allow_txn_begin": false}}'),
    ingress_metrics=native_filter("metrics", '{"workload": "ingress"}') if HOST == "native"
        else wasm_filter("txmesh_metrics", "FAIL_OPEN", '{"workload": "ingress"}'),
    otel_cluster=OTEL_CLUSTER, order=ep(15006), payment=ep(15106), inventory=ep(15206),
    order_tls=upstream_tls("ingress", "order", "    "), payment_tls=upstream_tls("ingress", "payment", "    "),
    inventory_tls=upstream_tls("ingress", "inventory", "    ")))

if ARGS.check:
    differ = [f for f in sorted(os.listdir(OUT))
              if not os.path.exists(os.path.join(COMMITTED, f)) or not filecmp.cmp(os.path.join(OUT, f), os.path.join(COMMITTED, f), shallow=False)]
    flag = " --host native" if HOST == "native" else ""
    if differ:
        sys.exit("%s/ differs from scripts/dev/gen-sidecar-configs.py%s for: %s (regenerate: scripts/dev/gen-sidecar-configs.py%s)" % (COMMITTED, flag, ", ".join(differ), flag))
    print("%s/: %d configs as generated" % (COMMITTED, len(os.listdir(OUT))))
