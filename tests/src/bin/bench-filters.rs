//! What each filter costs: the same Envoy (`--concurrency 1`), the same fast
//! upstream, the same load (wrk, fixed connections), with no filter (the
//! baseline), the metrics filter, the txn filter on non-transactional traffic,
//! and both, measured in alternating rounds (A B C D A B C D ...) in one run.
//!
//! Also: a trivial wasm filter (the floor), a Lua equivalent of the metrics
//! filter, the router, authz, and the whole chain.
//!
//! Run: `make bench-filters` (or `bench-filters [secs] [connections] [rounds] [concurrency]`).
//! Needs `wrk` (Debian package; `scripts/setup.sh --bench` installs it).

use serde_json::json;
use std::process::Command;
use txmesh_tests::{median, Filter, Sidecar, Upstream};

/// What txmesh_metrics does per request, as far as Envoy's Lua API allows:
/// read and remove the peer header, build the same label tuple (reporter,
/// source, destination, code, flags, protocol) at the response, keep it in
/// dynamic metadata. Lua cannot define or update stats, nor read response
/// flags, byte counts or the duration at response time: it does less.
const LUA_METRICS: &str = r#"
function envoy_on_request(h)
  local hs = h:headers()
  local peer = hs:get("x-txmesh-source-workload")
  if peer then hs:remove("x-txmesh-source-workload") end
  local grpc = (hs:get("content-type") or ""):find("^application/grpc") ~= nil
  local md = h:streamInfo():dynamicMetadata()
  md:set("txmesh", "source", peer or "unknown")
  md:set("txmesh", "protocol", grpc and "grpc" or "http")
end
function envoy_on_response(h)
  local md = h:streamInfo():dynamicMetadata():get("txmesh") or {}
  local code = h:headers():get(":status") or "0"
  local tuple = "reporter=.=inbound;.;source_workload=.=" .. (md.source or "unknown")
    .. ";.;destination_service=.=bench;.;response_code=.=" .. code
    .. ";.;response_flags=.=-;.;request_protocol=.=" .. (md.protocol or "http")
    .. ";.;grpc_response_status=.=;.;"
  h:streamInfo():dynamicMetadata():set("txmesh", "tuple", tuple)
end
"#;

#[derive(Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Envoy's CPU time (user + system, all threads) per request served.
    cpu_us: f64,
}

/// User + system CPU time of a process so far, in clock ticks (/proc/<pid>/stat).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

fn wrk(url: &str, secs: u64, conns: u32, envoy_pid: u32, tck: f64) -> Run {
    let cpu_before = cpu_ticks(envoy_pid);
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "wrk",
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run wrk ({e}): scripts/setup.sh --bench installs it"));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    let cpu = cpu_before
        .zip(cpu_ticks(envoy_pid))
        .map(|(a, b)| (b - a) as f64 / tck * 1e6);
    // "  123456 requests in 5.00s, 12.3MB read"
    let requests: Option<f64> = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    Run {
        cpu_us: match (cpu, requests) {
            (Some(c), Some(n)) if n > 0.0 => c / n,
            _ => f64::NAN,
        },
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: field("50%").and_then(|v| ms(&v)).unwrap_or(f64::NAN),
        p99_ms: field("99%").and_then(|v| ms(&v)).unwrap_or(f64::NAN),
    }
}

/// Throughput, latency and Envoy CPU of each filter against no filter, in
/// one run (BENCHMARKS.md).
#[derive(clap::Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(default_value_t = 5)]
    secs: u64,
    /// Client connections.
    #[arg(default_value_t = 16)]
    conns: u32,
    /// Rounds (medians are reported).
    #[arg(default_value_t = 5)]
    rounds: usize,
    /// Envoy's `--concurrency`.
    #[arg(default_value_t = 1)]
    concurrency: u32,
}

fn main() {
    let Args {
        secs,
        conns,
        rounds,
        concurrency,
    } = clap::Parser::parse();
    // Two cores: Envoy gets CPU 0 to itself; this process (the upstream's
    // threads, started below, inherit it) and wrk share CPU 1.
    let pin = |cpu: &str, pid: u32| {
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", cpu, &pid.to_string()])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("taskset unavailable: results are noisier without CPU pinning");
        }
    };
    pin("1", std::process::id());
    let up = Upstream::fast();
    // The router needs its registry: one endpoint, the upstream.
    let etcd = txmesh_tests::Etcd::start();
    etcd.register("local_app", up.addr(), json!({}), 0);
    // Configured as the shop's sidecars are (docs/metrics.md, docs/protocol.md):
    // the listener's role in the config, which saves a listener-direction
    // lookup per request (the Lua script below hard-codes it too).
    let txn_config = json!({"node": "bench", "direction": "inbound"});
    let txn = || Filter::txn(txn_config.clone());
    // The gate `txmeshctl gate` prints for that config (Envoy's
    // match_delegate skips the filter for requests it would pass).
    let gate = txmesh_core::txn::config::TxnConfig::parse(txn_config.to_string().as_bytes())
        .map(|c| c.gate_matcher())
        .unwrap_or_else(|e| panic!("bench txn config: {e}"));
    let metrics_config = json!({"workload": "bench", "reporter": "inbound"});
    let metrics = || Filter::wasm("txmesh_metrics", metrics_config.clone());
    // The native module (libtxmesh.so): the same configs.
    let native_metrics = || Filter::native("metrics", metrics_config.clone());
    let router_config = json!({"services": {"local_app": {"strategy": "peak_ewma"}}});
    let router = || Filter::wasm("txmesh_router", router_config.clone());
    let native_router = || Filter::native("router", router_config.clone());
    let authz_config = json!({
        "default": "allow",
        "coordinators": [{"prefix": "spiffe://txmesh.local/ns/shop/sa/"}],
        "rules": [
            {"name": "no-admin", "action": "deny", "paths": ["/admin"]},
            {"name": "mesh-reads", "action": "allow", "methods": ["GET"],
             "principals": [{"glob": "spiffe://txmesh.local/ns/*/sa/*"}]},
        ],
    });
    let authz = || Filter::wasm("txmesh_authz", authz_config.clone());
    let native_authz = || Filter::native("authz", authz_config.clone());
    let mut configs: Vec<(&str, Sidecar)> = vec![
        ("no filter (baseline)", Sidecar::new("base")),
        (
            "trivial wasm on the SDK (sets one header)",
            Sidecar::new("trivial").inbound_filter(Filter::wasm("txmesh_trivial", json!({}))),
        ),
        (
            "trivial wasm, txmesh runtime (no SDK)",
            Sidecar::new("trivialraw")
                .inbound_filter(Filter::wasm("txmesh_trivial_raw", json!({}))),
        ),
        (
            "txmesh_metrics",
            Sidecar::new("metrics").inbound_filter(metrics()),
        ),
        (
            "Lua equivalent of txmesh_metrics",
            Sidecar::new("lua").inbound_filter(Filter(json!({
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": LUA_METRICS},
                }
            }))),
        ),
        (
            "txmesh_txn, non-txn traffic",
            Sidecar::new("txn").inbound_filter(txn()),
        ),
        (
            "txmesh_txn behind its gate, non-txn traffic",
            Sidecar::new("txngated").inbound_filter(txn().gated(gate.clone())),
        ),
        (
            "txmesh_router (peak_ewma)",
            Sidecar::new("router").etcd(&etcd).inbound_filter(router()),
        ),
        (
            "txmesh_authz",
            Sidecar::new("authz").inbound_filter(authz()),
        ),
        (
            "txmesh metrics, native (libtxmesh.so)",
            Sidecar::new("nmetrics").inbound_filter(native_metrics()),
        ),
        (
            "txmesh authz, native (libtxmesh.so)",
            Sidecar::new("nauthz").inbound_filter(native_authz()),
        ),
        (
            "txmesh router, native (libtxmesh.so)",
            Sidecar::new("nrouter")
                .etcd(&etcd)
                .inbound_filter(native_router()),
        ),
        (
            "chain: authz+router+metrics native, txn wasm behind its gate",
            Sidecar::new("nchain")
                .etcd(&etcd)
                .inbound_filter(native_authz())
                .inbound_filter(native_router())
                .inbound_filter(txn().gated(gate.clone()))
                .inbound_filter(native_metrics()),
        ),
        (
            "chain: authz+router+metrics wasm, txn wasm behind its gate",
            Sidecar::new("gchain")
                .etcd(&etcd)
                .inbound_filter(authz())
                .inbound_filter(router())
                .inbound_filter(txn().gated(gate.clone()))
                .inbound_filter(metrics()),
        ),
        (
            "full chain: authz+router+txn+metrics",
            Sidecar::new("chain")
                .etcd(&etcd)
                .inbound_filter(authz())
                .inbound_filter(router())
                .inbound_filter(txn())
                .inbound_filter(metrics()),
        ),
    ];
    // The floor of the native tier: libtxmesh.so built with feature `floor`
    // (`make bench-filters` puts it in target/floor/), a filter that sets
    // one header and bumps one counter — Envoy's dynamic-module filter by
    // itself, in this run.
    let floor_so = txmesh_tests::workspace_root().join("target/floor/native/libtxmesh.so");
    if floor_so.exists() {
        let mut f = Filter::native("floor", json!({}));
        f.0["typed_config"]["dynamic_module_config"] = json!({
            "module": {"local": {"filename": floor_so.display().to_string()}},
            "metrics_namespace": "txmesh",
        });
        configs.insert(
            1,
            (
                "native floor: sets one header, bumps one counter",
                Sidecar::new("nfloor").inbound_filter(f),
            ),
        );
    } else {
        eprintln!(
            "no {} (make bench-filters builds it): no native floor row",
            floor_so.display()
        );
    }
    // BENCH_COMPARE_TXN=<another txmesh_txn.wasm>: that build too, in the
    // same run (e.g. before a change that adds callbacks).
    if let Ok(path) = std::env::var("BENCH_COMPARE_TXN") {
        let compared = || {
            let mut f = txn();
            f.0["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] =
                json!(path.clone());
            f
        };
        configs.push((
            "txmesh_txn (compared build), non-txn traffic",
            Sidecar::new("txncmp").inbound_filter(compared()),
        ));
        configs.push((
            "txmesh_txn (compared build) behind its gate, non-txn traffic",
            Sidecar::new("txncmpgated").inbound_filter(compared().gated(gate.clone())),
        ));
    }
    // BENCH_PROFILE=N: instead of the filters, what one host call of each
    // kind costs: txmesh_probe with no call and with N calls of one kind
    // per request (see `profile_configs`).
    let probe_n: Option<u32> = std::env::var("BENCH_PROFILE")
        .ok()
        .and_then(|v| v.parse().ok());
    let configs = match probe_n {
        Some(n) => profile_configs(n),
        None => configs,
    };
    // BENCH_ONLY=metrics,lua keeps the baseline and the configurations whose
    // names contain one of the words (for quick comparisons).
    let only: Vec<String> = std::env::var("BENCH_ONLY")
        .map(|v| {
            v.split(',')
                .map(|w| w.trim().to_lowercase())
                .filter(|w| !w.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let configs: Vec<(&str, Sidecar)> = configs
        .into_iter()
        .enumerate()
        .filter(|(i, (name, _))| {
            *i == 0 || only.is_empty() || only.iter().any(|w| name.to_lowercase().contains(w))
        })
        .map(|(_, c)| c)
        .collect();
    // Load time: Envoy start to ready (admin /ready), median of 3 starts per
    // configuration; the difference to the baseline is loading and compiling
    // the wasm modules (V8) and configuring the filters.
    let mut startup: Vec<f64> = Vec::new();
    for (_, sc) in &configs {
        let mut t = Vec::new();
        for _ in 0..3 {
            let start = std::time::Instant::now();
            let e = sc.clone().app(&up).concurrency(concurrency).start();
            t.push(start.elapsed().as_secs_f64() * 1000.0);
            drop(e);
        }
        startup.push(median(t));
    }
    let envoys: Vec<(&str, txmesh_tests::envoy::Envoy)> = configs
        .into_iter()
        .map(|(n, sc)| (n, sc.app(&up).concurrency(concurrency).start()))
        .collect();
    if concurrency == 1 {
        for (_, e) in &envoys {
            pin("0", e.guard.pid());
        }
        println!("# Envoy 1.40 --concurrency 1 pinned to CPU 0; wrk -t1 -c{conns} -d{secs}s and the upstream on CPU 1; {rounds} rounds, configurations alternating");
    } else {
        println!("# Envoy 1.40 --concurrency {concurrency} on both CPUs (not pinned: they share with wrk and the upstream); wrk -t1 -c{conns} -d{secs}s; {rounds} rounds, configurations alternating");
    }
    let tck = clock_ticks_per_sec();
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); envoys.len()];
    for (_, e) in &envoys {
        wrk(&e.inbound_url("/"), 1, conns, e.guard.pid(), tck); // warm-up
    }
    println!(
        "{:<6} {:<44} {:>8} {:>8} {:>8} {:>12}",
        "round", "config", "req/s", "p50 ms", "p99 ms", "CPU us/req"
    );
    for r in 0..rounds {
        for (i, (name, e)) in envoys.iter().enumerate() {
            let run = wrk(&e.inbound_url("/"), secs, conns, e.guard.pid(), tck);
            println!(
                "{:<6} {:<44} {:>8.0} {:>8.3} {:>8.3} {:>12.2}",
                r + 1,
                name,
                run.rps,
                run.p50_ms,
                run.p99_ms,
                run.cpu_us
            );
            runs[i].push(run);
        }
    }
    let base_p50 = median(runs[0].iter().map(|r| r.p50_ms).collect());
    let base_cpu = median(runs[0].iter().map(|r| r.cpu_us).collect());
    println!();
    println!("# throughput / baseline: the median over rounds of (this configuration's req/s / the baseline's in the same round);");
    println!("# CPU: Envoy's user + system time per request (/proc/<pid>/stat), median of rounds; CPU ratio = baseline CPU / this CPU");
    println!("| configuration (median of {rounds}) | req/s | p50 ms | p99 ms | throughput / baseline | Envoy CPU µs/req (added) | CPU ratio | added p50 | start to ready ms (added) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, (name, _)) in envoys.iter().enumerate() {
        let rps = median(runs[i].iter().map(|r| r.rps).collect());
        let p50 = median(runs[i].iter().map(|r| r.p50_ms).collect());
        let p99 = median(runs[i].iter().map(|r| r.p99_ms).collect());
        let cpu = median(runs[i].iter().map(|r| r.cpu_us).collect());
        let ratio = median(
            runs[i]
                .iter()
                .zip(&runs[0])
                .map(|(a, b)| a.rps / b.rps)
                .collect(),
        );
        println!(
            "| {name} | {rps:.0} | {p50:.3} | {p99:.3} | {ratio:.3} | {cpu:.1} ({:+.1}) | {:.3} | {:+.3} ms | {:.0} ({:+.0}) |",
            cpu - base_cpu,
            base_cpu / cpu,
            p50 - base_p50,
            startup[i],
            startup[i] - startup[0]
        );
    }
    if let Some(n) = probe_n {
        // Row 1 is the probe making no call: the three callbacks.
        let cpu = |i: usize| median(runs[i].iter().map(|r| r.cpu_us).collect());
        println!();
        println!("| what (BENCH_PROFILE={n}, median of {rounds}) | Envoy CPU µs |");
        println!("| --- | ---: |");
        println!(
            "| three callbacks (create, request headers, log), no host call | {:.2} per request |",
            cpu(1) - base_cpu
        );
        for (i, (name, _)) in envoys.iter().enumerate().skip(2) {
            println!(
                "| {} | {:.2} per call |",
                name.trim_start_matches("probe: ")
                    .trim_end_matches(&format!(" ×{n}")),
                (cpu(i) - cpu(1)) / f64::from(n)
            );
        }
    }
}

/// The configurations of `BENCH_PROFILE=n`: the baseline, txmesh_probe
/// making no host call, and txmesh_probe making `n` calls of one kind per
/// request — the kinds the filters use.
fn profile_configs(n: u32) -> Vec<(&'static str, Sidecar)> {
    let probe = |id: &str, cfg: serde_json::Value| {
        Sidecar::new(id).inbound_filter(Filter::wasm("txmesh_probe", cfg))
    };
    // Names are leaked once per run: the table rows borrow them.
    let name = |what: &str| -> &'static str { Box::leak(format!("probe: {what} ×{n}").into()) };
    let attributes: [(&str, &[&str]); 5] = [
        ("code", &["response", "code"]),
        ("flags", &["response", "flags"]),
        ("size", &["response", "size"]),
        ("dur", &["request", "duration"]),
        ("cluster", &["xds", "cluster_name"]),
    ];
    // (what, sidecar id, op, header or key name)
    let calls = [
        ("request header get (host)", "hget", "get_header", "host"),
        (
            "request headers, all in one call",
            "hall",
            "get_headers",
            "",
        ),
        ("request header set", "hset", "set_header", "x-probe"),
        ("counter increment", "counter", "counter", ""),
        ("histogram record", "hist", "histogram", ""),
        ("clock (current time)", "clock", "clock", ""),
        ("monotonic clock (WASI)", "mclock", "monotonic_clock", ""),
        ("shared data get", "shared", "shared_get", "txmesh.probe"),
        (
            "txmesh_metrics' own work in the VM (no host call)",
            "mlogic",
            "metrics_logic",
            "",
        ),
    ];
    let mut configs = vec![
        ("no filter (baseline)", Sidecar::new("base")),
        ("probe: no host call", probe("none", json!({"op": "none"}))),
    ];
    for (id, path) in attributes {
        let cfg = json!({"op": "property", "path": path, "n": n});
        configs.push((
            name(&format!("attribute {}", path.join("."))),
            probe(id, cfg),
        ));
    }
    for (what, id, op, key) in calls {
        let cfg = json!({"op": op, "name": key, "n": n});
        configs.push((name(what), probe(id, cfg)));
    }
    configs
}
