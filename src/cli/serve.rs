//! `routeplane serve --config gateway.yaml`: run the OpenAI-compatible gateway.
//!
//! Wiring: the config is read once (`listen`, `policy`, `state` and
//! `decision_log` need a restart: a reload that changes them is refused);
//! the policy and the config file are served through the reload store, which
//! watches both, reloads on SIGHUP and keeps the last good version when a
//! reload fails.

use std::path::PathBuf;
use std::sync::Arc;

use routeplane::config::Config;
use routeplane::decision_log::{DecisionLog, Sink, DEFAULT_CAPACITY};
use routeplane::gateway::{self, Gateway, Options};
use routeplane::metrics::Metrics;
use routeplane::reload::{served_builder, Debounce, Paths, PolicyStore};

#[derive(clap::Args)]
pub struct Args {
    /// The gateway configuration (YAML)
    #[arg(long, short, default_value = "routeplane.yaml")]
    pub config: PathBuf,
    /// Listen on this address instead of the config's `listen`
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Do not watch the policy and config files (SIGHUP still reloads)
    #[arg(long)]
    pub no_watch: bool,
    /// Worker threads serving requests [default: one per core]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// On SIGTERM or Ctrl-C, how long requests in flight may take to finish
    /// before their connections are closed (a second signal stops at once)
    #[arg(long, default_value = "30s", value_parser = drain_timeout, value_name = "DURATION")]
    pub drain_timeout: std::time::Duration,
}

/// The longest drain `--drain-timeout` takes: longer is surely a slip.
const MAX_DRAIN: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `--drain-timeout`: a duration with its unit (a bare `30` is refused, not
/// read as 30 ms), at most [`MAX_DRAIN`].
fn drain_timeout(s: &str) -> Result<std::time::Duration, String> {
    if s.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("`{s}` has no unit: write e.g. `{}s`", s.trim()));
    }
    let d = routeplane::config::parse_duration(s)?;
    if d > MAX_DRAIN {
        return Err(format!("`{s}` is longer than the 24h this accepts"));
    }
    Ok(d)
}

pub fn run(args: Args) -> u8 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROUTEPLANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: log files and CI stay plain.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .try_init();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    // This runtime runs the control plane (reloads, signals); requests are
    // served by the workers' runtimes (`server::serve_workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("routeplane: cannot start the runtime: {e}");
            return 2;
        }
    };
    runtime.block_on(serve(config, args))
}

async fn serve(config: Config, args: Args) -> u8 {
    let listen = args.listen.unwrap_or(config.listen);
    let metrics = Arc::new(Metrics::new());
    let started = Arc::new(config.clone());
    let paths = Paths {
        policy: config.policy.clone(),
        config: Some(config.path.clone()),
    };
    // The config's warnings come with the policy's once the store loaded
    // (`served_builder`); said here only when it cannot.
    let config_warnings = || {
        for w in &config.warnings {
            eprintln!("{w}");
        }
    };
    if !config.policy.exists() {
        config_warnings();
        // Said in the config's terms: the path the user wrote and where.
        eprintln!(
            "{}",
            config.error_at(
                config.line_of_key("policy"),
                format!(
                    "the policy `{}` does not exist; `policy:` names a directory of .route files \
                     (or one .route file), relative to the config file's directory",
                    config.policy.display()
                ),
            )
        );
        return 1;
    }
    let store = match PolicyStore::load(paths, served_builder(started), Some(metrics.clone())) {
        Ok(s) => s,
        Err(failure) => {
            config_warnings();
            eprintln!(
                "routeplane: cannot serve `{}`:\n{failure}",
                config.policy.display()
            );
            return 1;
        }
    };
    let loaded = store.current();
    for w in &loaded.warnings {
        eprintln!("{w}");
    }
    let sink = Sink::from_config(config.decision_log.as_deref());
    let (log, writer) = match DecisionLog::start(sink, DEFAULT_CAPACITY, Some(metrics.clone())) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("routeplane: cannot open the decision log: {e}");
            return 2;
        }
    };
    let decision_log = config.decision_log.is_some().then_some(log);
    let budgets = match routeplane::state::open(&config.state) {
        Ok(s) => Arc::new(routeplane::budget::Budgets::new(s)),
        Err(e) => {
            eprintln!("routeplane: cannot open the budget state: {e}");
            return 2;
        }
    };
    let _ledger_trimmer = config
        .ledger_retention
        .and_then(|keep| budgets.trim_ledger_every(keep));
    let opts = Options {
        metrics: Some(metrics),
        decision_log,
        budgets: Some(budgets),
    };
    let gw = match Gateway::new(config, store.clone(), opts) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let _watch = if args.no_watch {
        None
    } else {
        match store.watch(Debounce::default()) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("routeplane: cannot watch the policy files, reload with SIGHUP: {e}");
                None
            }
        }
    };
    let _hup = store.listen_sighup();
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        usize::from,
    );
    let listeners = match gateway::server::bind_workers(listen, workers) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("routeplane: cannot listen on `{listen}`: {e}");
            return 2;
        }
    };
    let addr = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| listen.to_string(), |a| a.to_string());
    eprintln!(
        "routeplane: serving policy {} from `{}` on http://{addr}",
        loaded.version,
        gw.config.policy.display()
    );
    drop(loaded);
    let (stop, stopped) = tokio::sync::watch::channel(gateway::server::Stop::No);
    let threads = match gateway::server::serve_workers(listeners, gw.clone(), stopped) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("routeplane: cannot start the workers: {e}");
            return 2;
        }
    };
    stop_signal().await;
    eprintln!(
        "routeplane: shutting down: no new connections; the requests in flight may take {:?} to finish (a second Ctrl-C or SIGTERM stops now)",
        args.drain_timeout
    );
    let _ = stop.send(gateway::server::Stop::Drain(args.drain_timeout));
    let mut workers = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    tokio::select! {
        _ = &mut workers => {}
        () = stop_signal() => {
            eprintln!("routeplane: stopping now");
            let _ = stop.send(gateway::server::Stop::Now);
            let _ = workers.await;
        }
    }
    // Flush the decision log: drop every sender, then wait for the writer.
    // Connections still draining hold clones; wait a little, not forever.
    drop(gw);
    drop(store);
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::task::spawn_blocking(move || writer.join()),
    )
    .await;
    0
}

/// Ctrl-C, or SIGTERM (what service managers and container runtimes send):
/// either stops the workers and flushes the logs and the ledger spool.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
