//! `routeplane explain`: why one request goes where it goes.
//!
//! ```text
//! routeplane explain --policy DIR --tenant ID [--tenant-attrs JSON | --config gateway.yaml]
//!     --request req.json [--endpoint chat] [--stats stats.json] [--format human|json]
//! ```
//! `--request` is an OpenAI request body; features are extracted exactly as
//! the gateway does. `--stats` is `{"models": {"<name>": {"latency_ms": ..,
//! "first_token_ms": .., "success_rate": .., "breaker": "open"}}, "budget": "downgrade"}`.
//! `--policy` overrides the config's policy.
//!
//! Exit codes: 0 explained (even a denial), 1 the policy or inputs have
//! problems, 2 usage or I/O error.

use std::collections::BTreeMap;
use std::path::PathBuf;

use routeplane::compile::compile;
use routeplane::config::Config;
use routeplane::decide::{explain, ModelStats, RequestFeatures};
use routeplane::ir::Endpoint;
use routeplane::load;
use routeplane::policytest::{CaseStats, Thresholds};

#[derive(clap::Args)]
pub struct Args {
    /// The policy directory (or `.route` file); overrides the config's
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The gateway config, for the tenant's attributes (and the policy)
    #[arg(long)]
    config: Option<PathBuf>,
    /// The tenant id
    #[arg(long)]
    tenant: String,
    /// Tenant attributes as a JSON object (instead of the config's)
    #[arg(long)]
    tenant_attrs: Option<String>,
    /// The request body (OpenAI JSON)
    #[arg(long)]
    request: PathBuf,
    /// The endpoint the request is sent to
    #[arg(long, value_enum, default_value_t = EndpointArg::Chat)]
    endpoint: EndpointArg,
    /// The feature tag (header `x-routeplane-feature`)
    #[arg(long)]
    feature: Option<String>,
    /// The client confirms premium spend (header `x-routeplane-confirm`)
    #[arg(long)]
    confirm: bool,
    /// Live stats and budget state as JSON
    #[arg(long)]
    stats: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointArg {
    Chat,
    Embeddings,
    Images,
    AudioTranscription,
    AudioSpeech,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatsFile {
    #[serde(default)]
    models: BTreeMap<String, ModelStats>,
    #[serde(default)]
    budget: Thresholds,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> u8 {
    eprintln!("routeplane: {msg}");
    code
}

pub fn run(args: Args) -> u8 {
    let config = match &args.config {
        Some(path) => {
            // A config that cannot be read is an I/O error (2), as a missing
            // `--policy` or `--request` is; one that reads but is invalid is 1.
            if let Err(e) = std::fs::metadata(path) {
                return fail(2, format!("cannot read `{}`: {e}", path.display()));
            }
            match Config::load(path) {
                Ok(c) => Some(c),
                Err(e) => return fail(1, e),
            }
        }
        None => None,
    };
    let Some(policy_path) = args
        .policy
        .clone()
        .or_else(|| config.as_ref().map(|c| c.policy.clone()))
    else {
        return fail(2, "give `--policy DIR` or `--config gateway.yaml`");
    };
    let dir = match load::read_policy(&policy_path) {
        Ok(d) => d,
        Err(e) => return fail(2, e),
    };
    let p = match compile(&dir.sources) {
        Ok(p) => p,
        Err(a) => {
            for d in a.errors() {
                eprintln!("{}", routeplane::reload::render_one(&dir.sources, d));
            }
            return fail(1, "the policy has errors; nothing to explain");
        }
    };
    let attrs = match (&args.tenant_attrs, &config) {
        (Some(json), _) => match serde_json::from_str::<serde_json::Value>(json) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return fail(2, "`--tenant-attrs` must be a JSON object"),
            Err(e) => return fail(2, format!("`--tenant-attrs`: {e}")),
        },
        (None, Some(c)) => match c.tenants.iter().find(|t| t.id == args.tenant) {
            Some(t) => t.attrs.clone(),
            None => return fail(1, format!("tenant `{}` is not in the config", args.tenant)),
        },
        (None, None) => serde_json::Map::new(),
    };
    let tenant = match p.tenant(&args.tenant, &attrs) {
        Ok(t) => t,
        Err(errs) => {
            for e in errs {
                eprintln!("routeplane: {e}");
            }
            return 1;
        }
    };
    let body = match std::fs::read_to_string(&args.request) {
        Ok(t) => match serde_json::from_str::<serde_json::Value>(&t) {
            Ok(v) => v,
            Err(e) => return fail(2, format!("`{}`: {e}", args.request.display())),
        },
        Err(e) => return fail(2, format!("cannot read `{}`: {e}", args.request.display())),
    };
    let endpoint = match args.endpoint {
        EndpointArg::Chat => Endpoint::Chat,
        EndpointArg::Embeddings => Endpoint::Embeddings,
        EndpointArg::Images => Endpoint::Images,
        EndpointArg::AudioTranscription => Endpoint::AudioTranscription,
        EndpointArg::AudioSpeech => Endpoint::AudioSpeech,
    };
    // What the gateway refuses with a 400 is not explained as if it were served.
    if let Err(e) = routeplane::gateway::validate::body(endpoint, &body) {
        return fail(
            1,
            format!("the gateway would refuse this request (400): {e}"),
        );
    }
    let mut r = RequestFeatures::from_openai_json(endpoint, &body);
    if args.feature.is_some() {
        r.feature = args.feature.clone();
    }
    if let Err(e) = r.check_declared(&p) {
        return fail(
            1,
            format!("the gateway would refuse this request (400): {e}"),
        );
    }
    r.confirmed |= args.confirm;
    let stats_file = match &args.stats {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => match serde_json::from_str::<StatsFile>(&t) {
                Ok(s) => s,
                Err(e) => return fail(2, format!("`{}`: {e}", path.display())),
            },
            Err(e) => return fail(2, format!("cannot read `{}`: {e}", path.display())),
        },
        None => StatsFile::default(),
    };
    let stats = match CaseStats::new(&p, &stats_file.models, &stats_file.budget) {
        Ok(s) => s,
        Err(e) => return fail(1, e),
    };
    let trace = explain(&p, &tenant, &r, &stats);
    let out = match args.format {
        Format::Human => trace.to_string(),
        Format::Json => match serde_json::to_string_pretty(&trace) {
            Ok(s) => s + "\n",
            Err(e) => return fail(2, e),
        },
    };
    if !super::print_out(&out) {
        return 2;
    }
    0
}
