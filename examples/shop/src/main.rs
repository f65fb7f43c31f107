//! `shop <order|payment|inventory> --port P --db FILE --sidecar-inbound P [--sidecar-outbound P]` (`shop --help`)
//! `shop <service> --port P --db FILE --mesh PORT` (in Istio: other services
//! are reached by name, `http://<service>:PORT`, through the transparent sidecar)
//! `--register http://ETCD [--advertise IP:PORT] [--zone Z]`: keep this
//! instance in the txmesh service registry (docs/router.md); the address
//! defaults to the sidecar's inbound listener. Revoked on SIGTERM/SIGINT.
//! `--sidecar-status P`: the sidecar's plain status listener, when its
//! inbound listener takes mTLS only (envoy/*-sidecar.yaml).
//!
//! Each service listens on loopback, keeps its data in SQLite, implements the
//! txmesh participant endpoints, and on start (and every second) asks its
//! sidecar for the outcome of every transaction it still holds prepared.
//! `order` calls inventory (gRPC, `shop.v1.Inventory`) and payment (HTTP)
//! through its sidecar's outbound listener, forwarding `x-txmesh-txn`;
//! inventory also takes prepare/commit/abort as `txmesh.v1.Participant`
//! (gRPC) from its sidecar, next to its HTTP API on the same port.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use txmesh_shop::participant::{Ledger, Participant, Vote};
use txmesh_shop::services::{Inventory, Order, Payment};

/// A shop service: a txmesh participant with its data in SQLite.
#[derive(clap::Parser)]
#[command(name = "shop")]
struct Opts {
    /// Which service this process is.
    #[arg(value_enum)]
    service: Service,
    /// The port the service listens on (loopback).
    #[arg(long)]
    port: u16,
    /// Its SQLite database.
    #[arg(long)]
    db: String,
    /// Its sidecar's inbound listener (where its status endpoint is asked).
    #[arg(long, required_unless_present = "mesh")]
    sidecar_inbound: Option<u16>,
    /// Its sidecar's outbound listener (order calls payment and inventory there).
    #[arg(long)]
    sidecar_outbound: Option<u16>,
    /// In a mesh with transparent interception: the services' common port
    /// (other services are `http://<service>:PORT`).
    #[arg(long)]
    mesh: Option<u16>,
    /// Keep this instance in the txmesh service registry in this etcd.
    #[arg(long, value_name = "http://ETCD")]
    register: Option<String>,
    /// The address registered (default: the sidecar's inbound listener).
    #[arg(long, value_name = "IP:PORT", requires = "register")]
    advertise: Option<std::net::SocketAddr>,
    /// The zone registered.
    #[arg(long, requires = "register")]
    zone: Option<String>,
    /// Where the app asks its sidecar for transaction status (plain HTTP),
    /// when the inbound listener takes mTLS only.
    #[arg(long)]
    sidecar_status: Option<u16>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Service {
    Order,
    Payment,
    Inventory,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Order => "order",
            Service::Payment => "payment",
            Service::Inventory => "inventory",
        }
    }
}

impl Opts {
    fn parse_checked() -> Self {
        let o = <Self as clap::Parser>::parse();
        if o.service == Service::Order && o.sidecar_outbound.is_none() && o.mesh.is_none() {
            <Self as clap::CommandFactory>::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "order needs --sidecar-outbound or --mesh (it calls payment and inventory)",
                )
                .exit();
        }
        o
    }

    /// The sidecar's inbound listener (or, in a mesh, the common port).
    fn inbound(&self) -> u16 {
        self.sidecar_inbound.or(self.mesh).unwrap_or_default()
    }
}

struct App<L: Ledger> {
    p: Participant<L>,
    name: String,
    outbound: Option<u16>,
    mesh: Option<u16>,
}

/// Where a call to `service` goes: through the sidecar's outbound listener
/// on loopback (Host header names the service), or by name in a mesh.
#[derive(Clone, Copy)]
enum Via {
    Loopback(u16),
    Mesh(u16),
}

impl Via {
    fn url(self, service: &str, path: &str) -> (String, Option<String>) {
        match self {
            Via::Loopback(port) => (
                format!("http://127.0.0.1:{port}{path}"),
                Some(service.to_string()),
            ),
            Via::Mesh(port) => (format!("http://{service}:{port}{path}"), None),
        }
    }
}

type Shared<L> = Arc<App<L>>;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

fn txn_of(headers: &HeaderMap) -> Option<(String, u64)> {
    let txn = headers.get("x-txmesh-txn")?.to_str().ok()?.to_string();
    let deadline = headers
        .get("x-txmesh-deadline")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    Some((txn, deadline))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn prepare<L: Ledger + 'static>(
    State(app): State<Shared<L>>,
    headers: HeaderMap,
) -> Response {
    let Some((txn, _)) = txn_of(&headers) else {
        return error(StatusCode::BAD_REQUEST, "x-txmesh-txn is required");
    };
    match blocking(move || app.p.prepare(&txn)).await {
        Ok(Vote::Commit) => Json(json!({"vote": "commit"})).into_response(),
        Ok(Vote::ReadOnly) => Json(json!({"vote": "readonly"})).into_response(),
        Ok(Vote::Abort(reason)) => Json(json!({"vote": "abort", "reason": reason})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Commits or aborts `txn` (HTTP and gRPC alike): `Ok(Err(conflict))` is
/// a commit of work never prepared, a protocol violation to report.
async fn apply<L: Ledger + 'static>(
    app: Shared<L>,
    txn: String,
    commit: bool,
) -> Result<Result<(), String>, String> {
    let r = blocking(move || {
        if commit {
            app.p.commit(&txn)
        } else {
            app.p.abort(&txn)
        }
    })
    .await;
    if let Ok(Err(conflict)) = &r {
        eprintln!("PROTOCOL VIOLATION: {conflict}");
    }
    r
}

async fn finish<L: Ledger + 'static>(app: Shared<L>, headers: HeaderMap, commit: bool) -> Response {
    let Some((txn, _)) = txn_of(&headers) else {
        return error(StatusCode::BAD_REQUEST, "x-txmesh-txn is required");
    };
    match apply(app, txn, commit).await {
        Ok(Ok(())) => Json(json!({"ok": true})).into_response(),
        Ok(Err(conflict)) => error(StatusCode::CONFLICT, conflict),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn commit<L: Ledger + 'static>(State(app): State<Shared<L>>, headers: HeaderMap) -> Response {
    finish(app, headers, true).await
}

async fn abort<L: Ledger + 'static>(State(app): State<Shared<L>>, headers: HeaderMap) -> Response {
    finish(app, headers, false).await
}

/// `txmesh.v1.Participant` (proto/txmesh/v1/participant.proto), generated
/// by tonic-build.
mod pb {
    tonic::include_proto!("txmesh.v1");
}

/// `shop.v1.Inventory` (proto/shop/v1/inventory.proto): how order calls
/// inventory.
mod shop_pb {
    tonic::include_proto!("shop.v1");
}

/// inventory's `shop.v1.Inventory`: the reservation `POST /reserve` makes,
/// as a gRPC method (order calls this one).
struct GrpcInventory(Shared<Inventory>);

#[tonic::async_trait]
impl shop_pb::inventory_server::Inventory for GrpcInventory {
    async fn reserve(
        &self,
        req: tonic::Request<shop_pb::ReserveRequest>,
    ) -> Result<tonic::Response<shop_pb::ReserveResponse>, tonic::Status> {
        let meta = |k: &str| {
            req.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let Some(txn) = meta("x-txmesh-txn") else {
            return Err(tonic::Status::invalid_argument(
                "a reservation must run in a transaction (x-txmesh-txn)",
            ));
        };
        let deadline = meta("x-txmesh-deadline")
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let shop_pb::ReserveRequest { sku, qty } = req.into_inner();
        let app = self.0.clone();
        let r = blocking(move || {
            app.p
                .work(&txn, deadline, |tx| Inventory::reserve(tx, &txn, &sku, qty))
        })
        .await;
        match r {
            Ok(Ok(price)) => Ok(tonic::Response::new(shop_pb::ReserveResponse {
                price,
                amount: price * qty,
            })),
            Ok(Err(e)) => Err(tonic::Status::invalid_argument(e)),
            Err(e) => Err(tonic::Status::internal(e)),
        }
    }
}

/// order's gRPC channel to inventory (through its sidecar's outbound
/// listener, `:authority` inventory; or by name in a mesh), made once.
fn inventory_channel(via: Via) -> Result<tonic::transport::Channel, String> {
    static CHANNEL: std::sync::OnceLock<tonic::transport::Channel> = std::sync::OnceLock::new();
    if let Some(c) = CHANNEL.get() {
        return Ok(c.clone());
    }
    let (url, host) = via.url("inventory", "");
    let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| format!("inventory at {url}: {e}"))?
        .timeout(Duration::from_secs(10));
    if let Some(h) = host {
        let origin = format!("http://{h}")
            .parse()
            .map_err(|e| format!("authority {h}: {e}"))?;
        ep = ep.origin(origin);
    }
    Ok(CHANNEL.get_or_init(|| ep.connect_lazy()).clone())
}

/// Reserves at inventory over gRPC inside `txn`: (price, amount), or the
/// HTTP status and message the checkout answers with.
async fn reserve_at_inventory(
    via: Via,
    txn: &str,
    sku: &str,
    qty: i64,
) -> Result<(i64, i64), (StatusCode, String)> {
    let channel = inventory_channel(via).map_err(|e| (StatusCode::BAD_GATEWAY, e))?;
    let mut client = shop_pb::inventory_client::InventoryClient::new(channel);
    let mut req = tonic::Request::new(shop_pb::ReserveRequest {
        sku: sku.to_string(),
        qty,
    });
    // The one header an app forwards.
    let txn = txn.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            format!("bad transaction id {txn:?}"),
        )
    })?;
    req.metadata_mut().insert("x-txmesh-txn", txn);
    match client.reserve(req).await {
        Ok(r) => {
            let r = r.into_inner();
            Ok((r.price, r.amount))
        }
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            Err((StatusCode::BAD_REQUEST, s.message().to_string()))
        }
        Err(s) => Err((
            StatusCode::BAD_GATEWAY,
            format!("inventory answered {:?}: {}", s.code(), s.message()),
        )),
    }
}

/// The participant endpoints as the gRPC service `txmesh.v1.Participant`:
/// the same ledger, the same semantics; inventory's sidecar calls it
/// (`app_protocol: grpc` in its txn filter).
struct GrpcControl<L: Ledger>(Shared<L>);

fn txn_in<T>(req: &tonic::Request<T>, txn: &str) -> Result<String, tonic::Status> {
    if txn.is_empty() {
        return Err(tonic::Status::invalid_argument("txn is required"));
    }
    // The metadata names the same transaction (the sidecar sends both).
    match req.metadata().get("x-txmesh-txn").map(|v| v.to_str()) {
        Some(Ok(m)) if m != txn => Err(tonic::Status::invalid_argument(format!(
            "x-txmesh-txn {m} and the message's txn {txn} differ"
        ))),
        _ => Ok(txn.to_string()),
    }
}

impl<L: Ledger + 'static> GrpcControl<L> {
    async fn finish(&self, txn: String, commit: bool) -> Result<(), tonic::Status> {
        match apply(self.0.clone(), txn, commit).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(conflict)) => Err(tonic::Status::failed_precondition(conflict)),
            Err(e) => Err(tonic::Status::internal(e)),
        }
    }
}

#[tonic::async_trait]
impl<L: Ledger + 'static> pb::participant_server::Participant for GrpcControl<L> {
    async fn prepare(
        &self,
        req: tonic::Request<pb::PrepareRequest>,
    ) -> Result<tonic::Response<pb::PrepareResponse>, tonic::Status> {
        let txn = txn_in(&req, &req.get_ref().txn)?;
        let app = self.0.clone();
        let (vote, reason) = match blocking(move || app.p.prepare(&txn)).await {
            Ok(Vote::Commit) => (pb::Vote::Commit, String::new()),
            Ok(Vote::ReadOnly) => (pb::Vote::ReadOnly, String::new()),
            Ok(Vote::Abort(reason)) => (pb::Vote::Abort, reason),
            Err(e) => return Err(tonic::Status::internal(e)),
        };
        Ok(tonic::Response::new(pb::PrepareResponse {
            vote: vote as i32,
            reason,
        }))
    }

    async fn commit(
        &self,
        req: tonic::Request<pb::CommitRequest>,
    ) -> Result<tonic::Response<pb::CommitResponse>, tonic::Status> {
        let txn = txn_in(&req, &req.get_ref().txn)?;
        self.finish(txn, true).await?;
        Ok(tonic::Response::new(pb::CommitResponse {}))
    }

    async fn abort(
        &self,
        req: tonic::Request<pb::AbortRequest>,
    ) -> Result<tonic::Response<pb::AbortResponse>, tonic::Status> {
        let txn = txn_in(&req, &req.get_ref().txn)?;
        self.finish(txn, false).await?;
        Ok(tonic::Response::new(pb::AbortResponse {}))
    }
}

fn participant_routes<L: Ledger + 'static>() -> Router<Shared<L>> {
    Router::new()
        .route("/txmesh/prepare", post(prepare::<L>))
        .route("/txmesh/commit", post(commit::<L>))
        .route("/txmesh/abort", post(abort::<L>))
        .route("/health", get(|| async { "ok" }))
}

/// `POST /checkout` (order).
#[derive(serde::Deserialize)]
struct CheckoutReq {
    customer: String,
    sku: String,
    qty: i64,
}

/// `POST /reserve` (inventory), as order sends it.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReserveReq {
    sku: String,
    qty: i64,
}

/// inventory's answer to `/reserve`.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReserveResp {
    price: i64,
    amount: i64,
}

/// `POST /charge` (payment), as order sends it.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChargeReq {
    customer: String,
    amount: i64,
}

/// A service's error answer.
#[derive(serde::Deserialize)]
struct ErrorResp {
    error: String,
}

/// The typed body of a business call; `want` says the expected shape when
/// the JSON is valid but not that shape (a 400 either way).
fn body_of<T: serde::de::DeserializeOwned>(body: &str, want: &str) -> Result<T, String> {
    serde_json::from_str::<T>(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("invalid JSON: {e}")
        } else {
            want.to_string()
        }
    })
}

async fn charge(State(app): State<Shared<Payment>>, headers: HeaderMap, body: String) -> Response {
    let Some((txn, deadline)) = txn_of(&headers) else {
        return error(
            StatusCode::BAD_REQUEST,
            "a charge must run in a transaction (x-txmesh-txn)",
        );
    };
    let ChargeReq { customer, amount } = match body_of(
        &body,
        "want {\"customer\": string, \"amount\": integer cents}",
    ) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let r = blocking(move || {
        app.p.work(&txn, deadline, |tx| {
            Payment::charge(tx, &txn, &customer, amount)
        })
    })
    .await;
    match r {
        Ok(Ok(())) => Json(json!({"charged": amount})).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn account(State(app): State<Shared<Payment>>, Path(customer): Path<String>) -> Response {
    let c = customer.clone();
    match blocking(move || app.p.with_tx(|tx| Payment::balance(tx, &c))).await {
        Ok(Some(balance)) => {
            Json(json!({"customer": customer, "balance": balance})).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("unknown customer {customer:?}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn reserve(
    State(app): State<Shared<Inventory>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some((txn, deadline)) = txn_of(&headers) else {
        return error(
            StatusCode::BAD_REQUEST,
            "a reservation must run in a transaction (x-txmesh-txn)",
        );
    };
    let ReserveReq { sku, qty } = match body_of(&body, "want {\"sku\": string, \"qty\": integer}") {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let r = blocking(move || {
        app.p
            .work(&txn, deadline, |tx| Inventory::reserve(tx, &txn, &sku, qty))
    })
    .await;
    match r {
        Ok(Ok(price)) => Json(ReserveResp {
            price,
            amount: price * qty,
        })
        .into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn stock(State(app): State<Shared<Inventory>>, Path(sku): Path<String>) -> Response {
    let s = sku.clone();
    match blocking(move || app.p.with_tx(|tx| Inventory::stock(tx, &s))).await {
        Ok(Some((available, price))) => {
            Json(json!({"sku": sku, "available": available, "price": price})).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("unknown sku {sku:?}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// A call through the sidecar, forwarding the transaction.
/// Its answer: the status and the body (JSON or not).
fn call<B: serde::Serialize>(
    via: Via,
    host: &str,
    path: &str,
    txn: &str,
    body: &B,
) -> Result<(u16, String), String> {
    // One agent per process: its connections to the sidecar are reused.
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    let agent = AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into()
    });
    let (url, host_header) = via.url(host, path);
    let mut req = agent.post(&url);
    if let Some(h) = host_header {
        req = req.header("host", h);
    }
    let mut resp = req
        .header("x-txmesh-txn", txn)
        .header("content-type", "application/json")
        .send(serde_json::to_string(body).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{host}: {e}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_to_string().unwrap_or_default()))
}

/// What a service's 400 says (its `error`), else its whole answer.
fn error_of(text: &str) -> String {
    serde_json::from_str::<ErrorResp>(text).map_or_else(|_| text.to_string(), |e| e.error)
}

async fn checkout(State(app): State<Shared<Order>>, headers: HeaderMap, body: String) -> Response {
    let Some((txn, deadline)) = txn_of(&headers) else {
        return error(
            StatusCode::BAD_REQUEST,
            "checkout runs in a transaction: call it through the sidecar",
        );
    };
    let CheckoutReq { customer, sku, qty } = match body_of(
        &body,
        "want {\"customer\": string, \"sku\": string, \"qty\": integer}",
    ) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if qty <= 0 {
        return error(StatusCode::BAD_REQUEST, "qty must be positive");
    }
    let via = match (app.mesh, app.outbound) {
        (Some(port), _) => Via::Mesh(port),
        (None, Some(port)) => Via::Loopback(port),
        (None, None) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no way to reach other services",
            )
        }
    };
    // inventory over gRPC, then payment over HTTP (and the order itself).
    let amount = match reserve_at_inventory(via, &txn, &sku, qty).await {
        Ok((_, amount)) => amount,
        Err((status, msg)) => return error(status, msg),
    };
    blocking(move || {
        let charge = ChargeReq {
            customer: customer.clone(),
            amount,
        };
        let (st, pay) = match call(via, "payment", "/charge", &txn, &charge) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_GATEWAY, e),
        };
        if st == 400 {
            return error(StatusCode::BAD_REQUEST, error_of(&pay));
        }
        if st != 200 {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("payment answered {st}: {pay}"),
            );
        }
        let created = app.p.work(&txn, deadline, |tx| {
            Order::create(tx, &txn, &customer, &sku, qty, amount).map(Ok)
        });
        match created {
            // Delivered to the client only if the transaction commits (on
            // abort the sidecar answers 409 instead).
            Ok(Ok(id)) => {
                Json(json!({"order_id": id, "txn": txn, "outcome": "committed", "amount": amount}))
                    .into_response()
            }
            Ok(Err(e)) => error(StatusCode::CONFLICT, e),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    })
    .await
}

async fn get_order(State(app): State<Shared<Order>>, Path(id): Path<i64>) -> Response {
    match blocking(move || app.p.with_tx(|tx| Order::get(tx, id))).await {
        Ok(Some(o)) => Json(o).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no order {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Every second: ask the sidecar about transactions held prepared (recovery
/// after a crash, or a lost commit), and release work never prepared by its
/// deadline.
fn recovery<L: Ledger + 'static>(app: Shared<L>, inbound: u16) {
    // The status endpoint is answered by any sidecar's inbound listener: our
    // own on loopback, or (in a mesh) our service's, by name.
    let base = match app.mesh {
        Some(port) => format!("http://{}:{port}", app.name),
        None => format!("http://127.0.0.1:{inbound}"),
    };
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        loop {
            for (txn, deadline) in app.p.prepared().unwrap_or_default() {
                let url = format!("{base}/txmesh/txns/{txn}");
                let Ok(mut r) = agent
                    .get(&url)
                    .header("x-txmesh-deadline", deadline.to_string())
                    .call()
                else {
                    continue;
                };
                let text = r.body_mut().read_to_string().unwrap_or_default();
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let applied = match v["outcome"].as_str() {
                    Some("committed") => Some(app.p.commit(&txn)),
                    Some("aborted") => Some(app.p.abort(&txn)),
                    _ => None,
                };
                if let Some(r) = applied {
                    eprintln!("{}: recovered {txn}: {} ({r:?})", app.name, v["outcome"]);
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            if let Ok(n) = app.p.release_expired(now) {
                if n > 0 {
                    eprintln!(
                        "{}: released {n} transaction(s) never prepared by their deadline",
                        app.name
                    );
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

async fn serve(router: Router, port: u16, name: &str) {
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("shop {name}: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("shop {name}: listening on 127.0.0.1:{port}");
    if let Err(e) = axum::serve(listener, router).await {
        eprintln!("shop {name}: {e}");
        std::process::exit(1);
    }
}

fn start<L: Ledger + 'static>(o: &Opts, ledger: L) -> Shared<L> {
    let p = Participant::open(&o.db, ledger).unwrap_or_else(|e| {
        eprintln!("shop {}: cannot open {}: {e}", o.service.name(), o.db);
        std::process::exit(1);
    });
    let app = Arc::new(App {
        p,
        name: o.service.name().to_string(),
        outbound: o.sidecar_outbound,
        mesh: o.mesh,
    });
    recovery(app.clone(), o.sidecar_status.unwrap_or(o.inbound()));
    app
}

#[tokio::main]
async fn main() {
    let o = Opts::parse_checked();
    let router = match o.service {
        Service::Payment => participant_routes::<Payment>()
            .route("/charge", post(charge))
            .route("/accounts/{customer}", get(account))
            .with_state(start(&o, Payment)),
        Service::Inventory => {
            let app = start(&o, Inventory);
            let control = pb::participant_server::ParticipantServer::new(GrpcControl(app.clone()));
            let api = shop_pb::inventory_server::InventoryServer::new(GrpcInventory(app.clone()));
            participant_routes::<Inventory>()
                .route("/reserve", post(reserve))
                .route("/stock/{sku}", get(stock))
                .with_state(app)
                .merge(
                    tonic::service::Routes::new(control)
                        .add_service(api)
                        .into_axum_router(),
                )
        }
        Service::Order => participant_routes::<Order>()
            .route("/checkout", post(checkout))
            .route("/orders/{id}", get(get_order))
            .with_state(start(&o, Order)),
    };
    let registration = o.register.as_deref().map(|etcd| {
        let addr = o
            .advertise
            .map(|a| a.to_string())
            .unwrap_or_else(|| format!("127.0.0.1:{}", o.inbound()));
        txmesh_shop::registry::Registration::start(etcd, o.service.name(), &addr, o.zone.as_deref())
    });
    let name = o.service.name();
    tokio::spawn(async move {
        shutdown_signal().await;
        if let Some(r) = registration {
            let _ = tokio::task::spawn_blocking(move || r.revoke()).await;
        }
        eprintln!("shop {name}: stopped");
        std::process::exit(0);
    });
    serve(router, o.port, o.service.name()).await;
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
