//! `routeplane serve --config gateway.yaml`: run the OpenAI-compatible gateway.

use std::path::PathBuf;
use std::sync::Arc;

use routeplane::config::Config;
use routeplane::gateway::{self, engine, FixedPolicy, Gateway};

#[derive(clap::Args)]
pub struct Args {
    /// The gateway configuration (YAML)
    #[arg(long, short, default_value = "routeplane.yaml")]
    pub config: PathBuf,
    /// Listen on this address instead of the config's `listen`
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
}

pub fn run(args: Args) -> u8 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROUTEPLANE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    let policy = match load_policy(&config) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("routeplane: cannot start the runtime: {e}");
            return 2;
        }
    };
    runtime.block_on(async move {
        let version = policy.version().to_string();
        let gw = match Gateway::new(config, Arc::new(FixedPolicy::new(policy))) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        };
        let listener = match tokio::net::TcpListener::bind(gw.config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("routeplane: cannot listen on `{}`: {e}", gw.config.listen);
                return 2;
            }
        };
        let addr = listener
            .local_addr()
            .map_or_else(|_| gw.config.listen.to_string(), |a| a.to_string());
        eprintln!(
            "routeplane: serving policy {version} from `{}` on http://{addr}",
            gw.config.policy.display()
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("routeplane: shutting down");
        };
        gateway::server::serve(listener, gw, shutdown).await;
        0
    })
}

/// Read and compile the policy the config names; errors rendered with their locations.
pub fn load_policy(config: &Config) -> Result<engine::CompiledPolicy, String> {
    let dir = routeplane::load::read_policy(&config.policy)
        .map_err(|e| format!("{}: {e}", config.path.display()))?;
    engine::compile(&dir.sources).map_err(|analysis| {
        let mut out = format!(
            "routeplane: the policy `{}` has errors:",
            config.policy.display()
        );
        for d in analysis.errors() {
            let loc = d
                .span()
                .map(|s| dir.sources.location(s))
                .unwrap_or_default();
            out.push_str(&format!("\n  {loc}: error[{}]: {}", d.code, d.message));
        }
        out
    })
}
