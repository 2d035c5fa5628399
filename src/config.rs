//! The gateway configuration: everything that is not policy.
//!
//! One YAML file names the listen address, the policy directory, the
//! providers (how to reach them; secrets only through environment variables),
//! the tenants (key hashes and attributes), the admin token and where the
//! decision log goes. Every mistake is reported at load with the file, the
//! line and what is wrong: unknown fields, unset environment variables, bad
//! URLs and malformed hashes never wait for the first request.
//!
//! Tenant attributes are checked against the policy's tenant schema by the
//! gateway when a policy is loaded (`CompiledPolicy::tenant`), since the
//! schema can change on every reload; [`Config::line_of_tenant`] gives those
//! errors a location here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The default body size limit: large enough for an image or a short audio file.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

// ------------------------------------------------------------------ errors

/// One problem in the configuration file, with its location when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based.
    pub column: Option<usize>,
    pub message: String,
}

impl ConfigError {
    /// The same problem as a warning: `file:line: warning: message`, as
    /// policy warnings read (`file:line:col: warning[code]: message`).
    pub fn as_warning(&self) -> String {
        let at = match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{}:{l}:{c}", self.file),
            (Some(l), None) => format!("{}:{l}", self.file),
            _ => self.file.clone(),
        };
        format!("{at}: warning: {}", self.message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn render(errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

// ------------------------------------------------------------------ the resolved configuration

/// A secret read from the environment. Never printed, never serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A SHA-256 digest of a key or token.
pub type KeyHash = [u8; 32];

pub fn sha256(s: &str) -> KeyHash {
    Sha256::digest(s.as_bytes()).into()
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The configuration file itself.
    pub path: PathBuf,
    pub listen: SocketAddr,
    /// The policy directory (or file), resolved against the config file's directory.
    pub policy: PathBuf,
    pub providers: Vec<ProviderConfig>,
    pub tenants: Vec<TenantConfig>,
    /// `None` disables the admin endpoints.
    pub admin_token_sha256: Option<KeyHash>,
    /// Where decision log lines go; `None` disables the log.
    pub decision_log: Option<PathBuf>,
    pub max_body_bytes: usize,
    /// Where budget counters and the spend ledger live (`state:`).
    pub state: crate::state::Backend,
    /// How long ledger entries are kept (`state.ledger_retention`); `None`:
    /// for ever. Budget counters are not affected.
    pub ledger_retention: Option<Duration>,
    /// Problems that do not stop the gateway (plain keys in the file), shown at start.
    pub warnings: Vec<String>,
    /// The text of the file, to locate errors found later (tenant attributes).
    text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible API.
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
    /// The built-in deterministic mock, answered in-process.
    Mock,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Mock => "mock",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// The provider's name in the policy.
    pub name: String,
    pub kind: ProviderKind,
    /// Without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// Policy model name -> the upstream's model id, when they differ.
    pub model_ids: BTreeMap<String, String>,
    pub mock: MockSettings,
    /// Where the provider is defined in the file.
    pub line: Option<usize>,
}

impl ProviderConfig {
    /// The model id to send upstream for a policy model.
    pub fn upstream_model<'a>(&'a self, policy_model: &'a str) -> &'a str {
        self.model_ids
            .get(policy_model)
            .map_or(policy_model, String::as_str)
    }
}

/// Behaviour of the built-in mock provider.
#[derive(Clone, Debug, PartialEq)]
pub struct MockSettings {
    /// Time to the complete answer (non-streaming) or to the last chunk (streaming).
    pub latency: Duration,
    /// Time to the first streamed chunk (and the response head); at most
    /// `latency` (a file giving both with `first_token` later is refused; one
    /// giving `first_token` alone has `latency` raised to it).
    pub first_token: Duration,
    /// Fraction of requests, in [0, 1], answered with `error_status`. Deterministic:
    /// exactly `round(n * rate)` of the first `n` requests fail.
    pub error_rate: f64,
    pub error_status: u16,
    /// Usage reported per answer.
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: u64,
    /// The number of streamed content chunks, at least 1.
    pub chunks: u32,
}

impl Default for MockSettings {
    fn default() -> Self {
        MockSettings {
            latency: Duration::ZERO,
            first_token: Duration::ZERO,
            error_rate: 0.0,
            error_status: 503,
            prompt_tokens: None,
            completion_tokens: 16,
            chunks: 4,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TenantConfig {
    pub id: String,
    pub key_sha256: KeyHash,
    pub attrs: serde_json::Map<String, serde_json::Value>,
    pub line: Option<usize>,
}

// ------------------------------------------------------------------ the file format

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: Section<String>,
    policy: String,
    #[serde(default)]
    providers: Section<Vec<RawProvider>>,
    #[serde(default)]
    tenants: Section<Vec<RawTenant>>,
    #[serde(default)]
    admin: Section<RawAdmin>,
    #[serde(default)]
    decision_log: Section<String>,
    #[serde(default)]
    max_body: Section<ByteSize>,
    #[serde(default)]
    state: Section<RawState>,
}

/// An optional key: absent (the default applies), written with no value
/// (`admin:` with its body commented out, `admin: ~`: an error, since the
/// default is rarely what the writer meant), or given.
#[derive(Debug, Default)]
enum Section<T> {
    #[default]
    Absent,
    Empty,
    Given(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Section<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Section::Empty,
            Some(v) => Section::Given(v),
        })
    }
}

impl<T> Section<T> {
    /// The value, `None` when absent or empty.
    fn given(self) -> Option<T> {
        match self {
            Section::Given(v) => Some(v),
            Section::Absent | Section::Empty => None,
        }
    }
}

/// The entries of a map of free-form keys, in file order. A key given twice
/// is an error located at the repeat: serde_json's and std's maps keep one
/// silently, and with `attrs: { plan: free, plan: enterprise }` the last
/// would win (a free tenant on the enterprise plan).
fn unique_entries<'de, D, V>(d: D, what: &'static str) -> Result<Vec<(String, V)>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V> {
        what: &'static str,
        value: std::marker::PhantomData<V>,
    }
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a map of {} names to values", self.what)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, V)> = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            while let Some(key) = map.next_key_seed(NewKey {
                what: self.what,
                seen: &seen,
            })? {
                let value = map.next_value()?;
                seen.insert(key.clone());
                out.push((key, value));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Entries {
        what,
        value: std::marker::PhantomData,
    })
}

/// A map key not seen before. The check runs inside the key's own
/// deserialization, so serde_yaml locates the error at the repeated key.
struct NewKey<'a> {
    what: &'static str,
    seen: &'a std::collections::BTreeSet<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for NewKey<'_> {
    type Value = String;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NewKey<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<String, E> {
        if self.seen.contains(key) {
            return Err(E::custom(format!("{} `{key}` {GIVEN_TWICE}", self.what)));
        }
        Ok(key.to_string())
    }
}

/// The end of every repeated-key message, to find them again for
/// [`name_entry`].
const GIVEN_TWICE: &str = "is given twice: keep one";

/// A tenant's `attrs:`, each attribute once.
#[derive(Debug, Default)]
struct Attrs(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for Attrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Attrs(unique_entries(d, "attribute")?.into_iter().collect()))
    }
}

/// A provider's `models:`, each policy model once.
#[derive(Debug, Default)]
struct Models(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Models {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries: Vec<(String, UpstreamId)> = unique_entries(d, "model")?;
        Ok(Models(entries.into_iter().map(|(k, v)| (k, v.0)).collect()))
    }
}

/// The upstream's id for a model: never blank, never YAML's null (`~`
/// arrives as the string "~" when a string is expected), which would be sent
/// upstream as the model's name.
struct UpstreamId(String);

impl<'de> Deserialize<'de> for UpstreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let id = Option::<String>::deserialize(d)?.unwrap_or_default();
        if id.trim().is_empty() || id == "~" || id == "null" {
            return Err(serde::de::Error::custom(
                "an upstream model id is empty: give the id the provider knows the model by, or delete the entry",
            ));
        }
        Ok(UpstreamId(id))
    }
}

/// `state: { backend: sqlite, path: ... }`, `{ backend: redis, url: ... }` or `{ backend: memory }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    backend: StateBackendKind,
    #[serde(default, deserialize_with = "given")]
    path: Option<String>,
    #[serde(default, deserialize_with = "given")]
    url: Option<String>,
    #[serde(default, deserialize_with = "given")]
    ledger_retention: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StateBackendKind {
    Sqlite,
    Redis,
    Memory,
}

/// The SQLite file used when the config has no `state:` section, relative to
/// the config. In a directory of its own: the gateway watches the config's
/// directory for edits, and every write of the database would wake it.
pub const DEFAULT_STATE_FILE: &str = "routeplane-state/state.db";

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    kind: ProviderKind,
    #[serde(default, deserialize_with = "given")]
    base_url: Option<String>,
    #[serde(default, deserialize_with = "given")]
    api_key_env: Option<String>,
    #[serde(default)]
    models: Section<Models>,
    #[serde(default)]
    mock: Section<RawMock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMock {
    #[serde(default, deserialize_with = "given")]
    latency: Option<DurationStr>,
    #[serde(default, deserialize_with = "given")]
    first_token: Option<DurationStr>,
    #[serde(default, deserialize_with = "given")]
    error_rate: Option<f64>,
    #[serde(default, deserialize_with = "given")]
    error_status: Option<u16>,
    #[serde(default, deserialize_with = "given")]
    usage: Option<RawUsage>,
    #[serde(default, deserialize_with = "given")]
    chunks: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsage {
    #[serde(default, deserialize_with = "given")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "given")]
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: String,
    #[serde(default, deserialize_with = "given")]
    key: Option<String>,
    #[serde(default, deserialize_with = "given")]
    key_sha256: Option<String>,
    #[serde(default)]
    attrs: Section<Attrs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default, deserialize_with = "given")]
    token_env: Option<String>,
    #[serde(default, deserialize_with = "given")]
    token_sha256: Option<String>,
}

const NO_VALUE: &str = "has no value: fill it in, or delete the key for the default";

/// An optional key that, when written, has a value. `latency:` with nothing
/// after it would otherwise read as "not given" and quietly take the default.
fn given<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    match Option::<T>::deserialize(d)? {
        Some(v) => Ok(Some(v)),
        None => Err(serde::de::Error::custom(NO_VALUE)),
    }
}

/// `250ms`, `2s`, `1min` or a number of milliseconds.
#[derive(Clone, Copy, Debug)]
struct DurationStr(Duration);

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Ms(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Ms(ms) => Ok(DurationStr(Duration::from_millis(ms))),
            Raw::Text(s) => parse_duration(&s)
                .map(DurationStr)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parse `250ms`, `2s`, `1.5s`, `1min`, `1h`, `90d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid duration `{s}`: expected a number and a unit (ms, s, min, h, d)")
    })?;
    let ms = match unit.trim() {
        "ms" | "" => value,
        "s" => value * 1000.0,
        "min" => value * 60_000.0,
        "h" => value * 3_600_000.0,
        "d" => value * 86_400_000.0,
        other => {
            return Err(format!(
                "invalid duration unit `{other}` in `{s}`: expected ms, s, min, h or d"
            ))
        }
    };
    if !ms.is_finite() || ms < 0.0 {
        return Err(format!("invalid duration `{s}`"));
    }
    Ok(Duration::from_micros((ms * 1000.0) as u64))
}

/// The shortest `ledger_retention`: shorter is surely a slip (`90` meant as
/// days, read as milliseconds, would empty the ledger).
const MIN_LEDGER_RETENTION: Duration = Duration::from_secs(3600);

/// `state.ledger_retention`: a duration with its unit, at least an hour.
fn ledger_retention(text: &str) -> Result<Duration, String> {
    if text.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "ledger_retention `{text}` has no unit: write e.g. `{}d` for days",
            text.trim()
        ));
    }
    let d = parse_duration(text).map_err(|e| format!("ledger_retention: {e}"))?;
    if d < MIN_LEDGER_RETENTION {
        return Err(format!(
            "ledger_retention `{text}` is shorter than an hour: the ledger would keep almost nothing (e.g. `90d`)"
        ));
    }
    Ok(d)
}

/// `10MiB`, `512KiB`, `1MB` or a number of bytes.
#[derive(Clone, Copy, Debug)]
struct ByteSize(usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: usize = num.parse().map_err(|_| {
        format!("invalid size `{s}`: expected a number and a unit (B, KB, KiB, MB, MiB)")
    })?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1024,
        "MB" => 1_000_000,
        "MiB" => 1024 * 1024,
        other => {
            return Err(format!(
                "invalid size unit `{other}` in `{s}`: expected B, KB, KiB, MB or MiB"
            ))
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

// ------------------------------------------------------------------ loading

impl Config {
    /// Read and validate a configuration file, resolving environment variables.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// As [`Config::load`], with the environment given (for tests).
    pub fn load_with_env(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = read_text(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: None,
                column: None,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&file, &text, &base, env)
    }

    /// Validate configuration text; `base` is the directory relative paths start from.
    pub fn parse(
        file: &str,
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        if let Some((line, column)) = too_deep(text) {
            return Err(ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line: Some(line),
                column: Some(column),
                message: format!(
                    "`[` and `{{` nested deeper than {MAX_FLOW_DEPTH} levels; a gateway config needs a few"
                ),
            }]));
        }
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
            let mut first = located(file, text, &e, 0);
            first.message = name_entry(text, first.message);
            // serde locates a repeated top-level key at the top mapping's
            // start; the repeat is the second line with it.
            if let Some(key) = first
                .message
                .strip_prefix("duplicate field `")
                .and_then(|k| k.strip_suffix('`'))
            {
                if let Some(l) = key_lines(text, key).nth(1) {
                    (first.line, first.column) = (Some(l), Some(1));
                }
            }
            ConfigErrors(section_errors(file, text, &first).unwrap_or_else(|| vec![first]))
        })?;
        let mut cx = Checker {
            file,
            text,
            errors: Vec::new(),
            warnings: Vec::new(),
            lines: std::cell::OnceCell::new(),
        };
        // The maps of free-form keys check their own; this catches a repeat
        // in any other mapping (a map inside an attribute's value).
        cx.errors.extend(repeated_key(file, text));

        let listen_text = cx
            .section(raw.listen, "listen", &format!("listen on {DEFAULT_LISTEN}"))
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                cx.error(cx.line_of("listen:", None), format!("invalid listen address `{listen_text}`: expected `host:port` such as `127.0.0.1:8080`"));
                SocketAddr::from(([127, 0, 0, 1], 8080))
            }
        };
        if raw.policy.trim().is_empty() {
            cx.error(
                key_line(text, "policy"),
                "`policy:` has no value: name the policy directory or file".to_string(),
            );
        }
        let policy = normalize(&base.join(&raw.policy));

        let mut providers: Vec<ProviderConfig> = Vec::new();
        let raw_providers = cx
            .section(raw.providers, "providers", "no providers")
            .unwrap_or_default();
        let names: Vec<String> = raw_providers.iter().map(|p| p.name.clone()).collect();
        for (i, p) in raw_providers.into_iter().enumerate() {
            let seen = names.iter().take(i).filter(|n| **n == p.name).count();
            let line = cx.line_of_nth("name:", Some(&p.name), seen);
            if seen > 0 {
                cx.error(line, format!("duplicate provider `{}`", p.name));
                continue;
            }
            if p.name.trim().is_empty() {
                cx.error(
                    line,
                    "a provider's `name` is empty: give the name the policy uses for it"
                        .to_string(),
                );
                continue;
            }
            let default_url = match p.kind {
                ProviderKind::Openai => "https://api.openai.com/v1",
                ProviderKind::Anthropic => "https://api.anthropic.com/v1",
                ProviderKind::Mock => "mock://",
            };
            let base_url = p
                .base_url
                .clone()
                .unwrap_or_else(|| default_url.to_string());
            if p.kind != ProviderKind::Mock {
                match base_url.parse::<hyper::Uri>() {
                    Ok(u)
                        if matches!(u.scheme_str(), Some("http" | "https"))
                            && u.authority().is_some()
                            && u.query().is_none() => {}
                    _ => cx.error(
                        cx.line_of("base_url:", Some(&base_url)).or(line),
                        format!("provider `{}`: invalid base_url `{base_url}`: expected an http or https URL without a query", p.name),
                    ),
                }
            } else if p.base_url.is_some() {
                cx.error(
                    cx.line_of("base_url:", p.base_url.as_deref()).or(line),
                    format!("provider `{}`: a mock provider takes no base_url", p.name),
                );
            }
            if p.kind != ProviderKind::Mock && !matches!(p.mock, Section::Absent) {
                cx.error(
                    line,
                    format!(
                        "provider `{}`: `mock` settings only apply to `kind: mock`",
                        p.name
                    ),
                );
            }
            let api_key = match &p.api_key_env {
                // The mock answers in-process and never reads a key; a
                // variable named here would only look like it mattered.
                Some(_) if p.kind == ProviderKind::Mock => {
                    cx.error(
                        cx.line_in_entry(line, "api_key_env").or(line),
                        format!(
                            "provider `{}`: a mock provider takes no API key: delete `api_key_env`",
                            p.name
                        ),
                    );
                    None
                }
                // The public APIs answer 401 to every request without a key:
                // say so now rather than on every request.
                None if p.kind != ProviderKind::Mock && p.base_url.is_none() => {
                    cx.error(
                        line,
                        format!(
                            "provider `{}`: `{default_url}` needs an API key: name the environment variable that holds it with `api_key_env`",
                            p.name
                        ),
                    );
                    None
                }
                None => None,
                Some(var) => match env(var) {
                    Some(v) if !v.is_empty() => Some(Secret(v)),
                    _ => {
                        cx.error(
                            cx.line_of("api_key_env:", Some(var)).or(line),
                            format!("provider `{}`: environment variable `{var}` (api_key_env) is not set", p.name),
                        );
                        None
                    }
                },
            };
            let mock = match p.mock {
                Section::Absent => MockSettings::default(),
                Section::Empty => {
                    cx.error(
                        cx.line_in_entry(line, "mock").or(line),
                        format!("provider `{}`: `mock:` has no value: fill it in, or delete the key for the defaults", p.name),
                    );
                    MockSettings::default()
                }
                Section::Given(m) => {
                    let d = MockSettings::default();
                    let first_token = m.first_token.map_or(d.first_token, |x| x.0);
                    // Only `first_token` given: the answer ends when it starts.
                    let latency = m.latency.map_or(d.latency, |x| x.0).max(first_token);
                    if let (Some(l), Some(f)) = (m.latency, m.first_token) {
                        if f.0 > l.0 {
                            cx.error(
                                cx.line_in_entry(line, "first_token").or(line),
                                format!("provider `{}`: `first_token` ({:?}) is later than `latency` ({:?}), the time to the whole answer: raise `latency` or lower `first_token`", p.name, f.0, l.0),
                            );
                        }
                    }
                    let chunks = m.chunks.unwrap_or(d.chunks);
                    if chunks == 0 {
                        cx.error(
                            cx.line_in_entry(line, "chunks").or(line),
                            format!("provider `{}`: `chunks` must be at least 1, got 0", p.name),
                        );
                    }
                    let error_rate = m.error_rate.unwrap_or(0.0);
                    if !(0.0..=1.0).contains(&error_rate) {
                        cx.error(cx.line_of("error_rate:", None).or(line), format!("provider `{}`: error_rate must be between 0 and 1, got {error_rate}", p.name));
                    }
                    let error_status = m.error_status.unwrap_or(d.error_status);
                    if !(400..=599).contains(&error_status) {
                        cx.error(cx.line_of("error_status:", None).or(line), format!("provider `{}`: error_status must be a 4xx or 5xx status, got {error_status}", p.name));
                    }
                    let usage = m.usage.unwrap_or(RawUsage {
                        prompt_tokens: None,
                        completion_tokens: None,
                    });
                    MockSettings {
                        latency,
                        first_token,
                        error_rate,
                        error_status,
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens.unwrap_or(d.completion_tokens),
                        chunks,
                    }
                }
            };
            let model_ids = match p.models {
                Section::Given(m) => m.0,
                Section::Absent => BTreeMap::new(),
                Section::Empty => {
                    cx.error(
                        cx.line_in_entry(line, "models").or(line),
                        format!("provider `{}`: `models:` has no value: fill it in, or delete the key to send the policy's model names", p.name),
                    );
                    BTreeMap::new()
                }
            };
            providers.push(ProviderConfig {
                name: p.name,
                kind: p.kind,
                base_url: base_url.trim_end_matches('/').to_string(),
                api_key,
                model_ids,
                mock,
                line,
            });
        }

        let mut tenants: Vec<TenantConfig> = Vec::new();
        // No tenant: every request would get a 401.
        const NO_TENANT: &str = "a gateway without tenants refuses every request (401)";
        let raw_tenants = match raw.tenants {
            Section::Given(t) if t.is_empty() => {
                cx.error(
                    key_line(text, "tenants"),
                    format!("`tenants:` lists no tenant: {NO_TENANT}"),
                );
                t
            }
            Section::Given(t) => t,
            Section::Empty => {
                cx.error(
                    key_line(text, "tenants"),
                    format!("`tenants:` has no value: list the tenants; {NO_TENANT}"),
                );
                Vec::new()
            }
            Section::Absent => {
                cx.warn(None, format!("no `tenants:`: {NO_TENANT}"));
                Vec::new()
            }
        };
        // How many tenants of each id came before, and which tenant has
        // each key: sets, not scans, so 10,000 tenants load in milliseconds.
        let mut ids_seen: HashMap<String, usize> = HashMap::new();
        let mut keys: HashMap<KeyHash, String> = HashMap::new();
        for t in raw_tenants {
            let seen = {
                let n = ids_seen.entry(t.id.clone()).or_default();
                *n += 1;
                *n - 1
            };
            let line = cx.line_of_nth("id:", Some(&t.id), seen);
            if seen > 0 {
                cx.error(line, format!("duplicate tenant `{}`", t.id));
                continue;
            }
            if t.id.trim().is_empty() {
                cx.error(
                    line,
                    "a tenant's `id` is empty: give each tenant a name (it appears in logs, budgets and the policy's errors)".to_string(),
                );
                continue;
            }
            let attrs = match t.attrs {
                Section::Given(a) => a.0,
                Section::Absent => serde_json::Map::new(),
                Section::Empty => {
                    cx.error(
                        cx.line_in_entry(line, "attrs").or(line),
                        format!("tenant `{}`: `attrs:` has no value: fill it in, or delete the key for the policy's defaults", t.id),
                    );
                    serde_json::Map::new()
                }
            };
            let hash = match (&t.key, &t.key_sha256) {
                (Some(_), Some(_)) => {
                    cx.error(
                        line,
                        format!(
                            "tenant `{}`: give either `key` or `key_sha256`, not both",
                            t.id
                        ),
                    );
                    continue;
                }
                (None, None) => {
                    cx.error(line, format!("tenant `{}`: missing `key_sha256` (the hex SHA-256 of the tenant's API key)", t.id));
                    continue;
                }
                (Some(k), None) => {
                    cx.warn(
                        line,
                        format!(
                            "tenant `{}` has a plain `key`; store `key_sha256: {}` instead",
                            t.id,
                            hex::encode(sha256(k))
                        ),
                    );
                    sha256(k)
                }
                (None, Some(h)) => match parse_hash(h) {
                    Some(h) => h,
                    None => {
                        cx.error(
                            cx.line_in_entry(line, "key_sha256").or(line),
                            format!("tenant `{}`: `key_sha256` must be 64 hex digits", t.id),
                        );
                        continue;
                    }
                },
            };
            if let Some(other) = keys.get(&hash) {
                cx.error(
                    line,
                    format!("tenant `{}` has the same key as tenant `{other}`", t.id),
                );
                continue;
            }
            keys.insert(hash, t.id.clone());
            tenants.push(TenantConfig {
                id: t.id,
                key_sha256: hash,
                attrs,
                line,
            });
        }

        let admin = cx.section(raw.admin, "admin", "the admin endpoints are off");
        let admin_token_sha256 = match admin {
            None => None,
            Some(a) => match (a.token_env, a.token_sha256) {
                (Some(var), None) => match env(&var) {
                    Some(v) if !v.is_empty() => Some(sha256(&v)),
                    _ => {
                        cx.error(
                            cx.line_of("token_env:", Some(&var)),
                            format!("environment variable `{var}` (admin token_env) is not set"),
                        );
                        None
                    }
                },
                (None, Some(h)) => match parse_hash(&h) {
                    Some(h) => Some(h),
                    None => {
                        cx.error(
                            cx.line_of("token_sha256:", None),
                            "admin `token_sha256` must be 64 hex digits".to_string(),
                        );
                        None
                    }
                },
                _ => {
                    cx.error(
                        cx.line_of("admin:", None),
                        "admin: give exactly one of `token_env` or `token_sha256`".to_string(),
                    );
                    None
                }
            },
        };

        let max_body_bytes = cx
            .section(raw.max_body, "max_body", "32MiB")
            .map_or(DEFAULT_MAX_BODY_BYTES, |b| b.0);
        if max_body_bytes == 0 {
            cx.error(
                cx.line_of("max_body:", None),
                "max_body must be greater than zero".to_string(),
            );
        }

        let raw_state = cx.section(
            raw.state,
            "state",
            &format!("SQLite in `{DEFAULT_STATE_FILE}`"),
        );
        let ledger_retention = raw_state
            .as_ref()
            .and_then(|st| st.ledger_retention.as_deref())
            .and_then(|text| match ledger_retention(text) {
                Ok(d) => Some(d),
                Err(message) => {
                    // On its own line, or in a flow map on `state:`'s.
                    let line = cx
                        .line_of("ledger_retention:", None)
                        .or_else(|| cx.line_of("state:", None));
                    cx.error(line, message);
                    None
                }
            });
        let state = match raw_state {
            None => crate::state::Backend::Sqlite(normalize(&base.join(DEFAULT_STATE_FILE))),
            Some(st) => match (st.backend, st.path, st.url) {
                (StateBackendKind::Sqlite, path, None) => crate::state::Backend::Sqlite(normalize(
                    &base.join(path.as_deref().unwrap_or(DEFAULT_STATE_FILE)),
                )),
                (StateBackendKind::Redis, None, Some(url)) => crate::state::Backend::Redis(url),
                (StateBackendKind::Memory, None, None) => crate::state::Backend::Memory,
                (kind, _, _) => {
                    let want = match kind {
                        StateBackendKind::Sqlite => "`path` (a file)",
                        StateBackendKind::Redis => "`url` (`redis://host:port/db`)",
                        StateBackendKind::Memory => "nothing else",
                    };
                    cx.error(
                        cx.line_of("state:", None),
                        format!("state: backend `{kind:?}` takes {want}").to_lowercase(),
                    );
                    crate::state::Backend::Memory
                }
            },
        };

        if let crate::state::Backend::Sqlite(db) = &state {
            let watched = [Some(base), Some(policy.as_path()), policy.parent()];
            if db.parent().is_some_and(|dir| {
                let dir = normalize(dir);
                watched.iter().flatten().any(|w| normalize(w) == dir)
            }) {
                cx.warn(
                    cx.line_of("state:", None),
                    format!(
                        "the state file `{}` is in a directory the gateway watches for edits, so every write wakes the watcher; give it a directory of its own (`path: routeplane-state/state.db`)",
                        db.display()
                    ),
                );
            }
        }

        let decision_log = cx.section(raw.decision_log, "decision_log", "no decision log");
        if decision_log.as_ref().is_some_and(|p| p.trim().is_empty()) {
            cx.error(
                key_line(text, "decision_log"),
                "`decision_log:` is empty: name a file, or delete the key for no decision log"
                    .to_string(),
            );
        }

        if !cx.errors.is_empty() {
            // In file order, whatever order the checks ran in.
            cx.errors.sort_by_key(|e| (e.line.is_none(), e.line));
            return Err(ConfigErrors(cx.errors));
        }
        Ok(Config {
            path: PathBuf::from(file),
            listen,
            policy,
            providers,
            tenants,
            admin_token_sha256,
            decision_log: decision_log.map(|p| normalize(&base.join(p))),
            max_body_bytes,
            state,
            ledger_retention,
            warnings: cx.warnings,
            text: text.to_string(),
        })
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// The line of a tenant's entry, for errors found when checking its
    /// attributes against a policy.
    pub fn line_of_tenant(&self, id: &str) -> Option<usize> {
        self.tenants
            .iter()
            .find(|t| t.id == id)
            .and_then(|t| t.line)
    }

    /// The line of a top-level `key:`, for errors found after loading.
    pub fn line_of_key(&self, key: &str) -> Option<usize> {
        key_line(&self.text, key)
    }

    /// The line setting `key` in the list entry starting at line `entry`
    /// (a provider's or a tenant's), for errors found after loading.
    pub fn line_in_entry(&self, entry: Option<usize>, key: &str) -> Option<usize> {
        line_in_entry(&self.text, entry, key)
    }

    /// An error located in this file.
    pub fn error_at(&self, line: Option<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.display().to_string(),
            line,
            column: None,
            message: message.into(),
        }
    }

    /// The raw text, for tools that point into it.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// `examples/../policies/saas` -> `policies/saas`, so errors name a path as
/// the user thinks of it (it may not exist yet). A `..` after a symlink is
/// kept: the directory it leads out of is the link's target's parent, not
/// the link's (a config in `deploy/`, a link to `releases/v2/config`, with
/// `policy: ../policy`), and the OS resolves it that way.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.last(), Some(Component::Normal(_)))
                    && !out
                        .iter()
                        .collect::<PathBuf>()
                        .symlink_metadata()
                        .is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

fn parse_hash(h: &str) -> Option<KeyHash> {
    let bytes = hex::decode(h.trim()).ok()?;
    bytes.try_into().ok()
}

/// Read a config file. Anything but a regular file (a FIFO, a device) is
/// refused before it is opened: reading a FIFO waits for a writer forever,
/// and a reload stuck on it would hold every later reload.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(std::io::Error::other("it is a directory"));
    }
    if !meta.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    std::fs::read_to_string(path)
}

/// Deeper flow collections than this are refused before YAML parsing: the
/// parser's time grows with the square of the depth (100,000 `[` took
/// minutes), and serde_yaml refuses anything past 128 levels anyway.
const MAX_FLOW_DEPTH: usize = 128;

/// Where `[`/`{` nesting first passes [`MAX_FLOW_DEPTH`] (1-based line and
/// column), outside comments and quoted strings. Brackets inside plain
/// scalars count too, which can only make a config with hundreds of them
/// on one path fail early.
fn too_deep(text: &str) -> Option<(usize, usize)> {
    #[derive(PartialEq)]
    enum In {
        Plain,
        Single,
        Double,
        Comment,
    }
    let mut state = In::Plain;
    let mut depth = 0usize;
    let (mut line, mut column) = (1, 0);
    let mut prev = '\n';
    let mut escaped = false;
    for c in text.chars() {
        column += 1;
        match state {
            In::Plain => match c {
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some((line, column));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                '\'' => state = In::Single,
                '"' => state = In::Double,
                '#' if prev.is_whitespace() => state = In::Comment,
                _ => {}
            },
            In::Single => {
                if c == '\'' {
                    state = In::Plain;
                }
            }
            In::Double => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    state = In::Plain;
                }
            }
            In::Comment => {}
        }
        if c == '\n' {
            line += 1;
            column = 0;
            if state == In::Comment {
                state = In::Plain;
            }
        }
        prev = c;
    }
    None
}

/// The line holding the value an `invalid ...` message quotes last
/// (`invalid size unit `x` in `10 x``), when exactly one line holds it.
fn value_line(text: &str, message: &str) -> Option<usize> {
    if !message.starts_with("invalid") {
        return None;
    }
    let quoted = message
        .rsplit('`')
        .nth(1)
        .filter(|q| !q.trim().is_empty())?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.split(" #").next().unwrap_or("").contains(quoted));
    match (lines.next(), lines.next()) {
        (Some((i, _)), None) => Some(i + 1),
        _ => None,
    }
}

/// A serde_yaml error of the text starting on line `offset + 1` of the file,
/// located in the file.
fn located(file: &str, text: &str, e: &serde_yaml::Error, offset: usize) -> ConfigError {
    let message = strip_location(&e.to_string());
    let (line, column) = match (
        e.location().map(|l| (l.line(), l.column())),
        value_line(text, &message),
    ) {
        // A value our own parser refused (`max_body: 10 parsecs`)
        // comes back located at the start of its mapping.
        (Some((1, 1)) | None, Some(l)) => (Some(l), None),
        (Some((l, c)), _) => (Some(l + offset), Some(c)),
        (None, None) => (None, None),
    };
    // `given` cannot know its key's name, and serde_yaml points at it or
    // before it (at the mapping's start for a key at its end): name the
    // first `key:` with nothing after it from there on.
    let (message, line, column) = match (message.strip_suffix(NO_VALUE), line) {
        (Some(path), Some(from)) => match key_without_value(text, from) {
            Some((l, key)) => (format!("{path}`{key}:` {NO_VALUE}"), Some(l), None),
            None => (message, line, column),
        },
        _ => (message, line, column),
    };
    ConfigError {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// The line setting `key` (block `key: v` or flow `{ key: v }`) in the
/// list entry whose line is `entry`, from that line to the entry's end
/// (the next line indented less than its fields).
fn line_in_entry(text: &str, entry: Option<usize>, key: &str) -> Option<usize> {
    let start = entry?.checked_sub(1)?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = text.lines().enumerate().skip(start);
    let (_, first) = lines.next()?;
    let fields = indent(first)
        + first
            .trim_start()
            .strip_prefix("- ")
            .map_or(0, |rest| 2 + rest.len() - rest.trim_start().len());
    let pattern = format!("{key}:");
    let sets = |l: &str| {
        let code = l.split(" #").next().unwrap_or("");
        code.match_indices(&pattern).any(|(i, _)| {
            code.get(..i).is_some_and(|before| {
                before.is_empty() || before.ends_with([' ', '\t', '{', ',', '-'])
            })
        })
    };
    if sets(first) {
        return Some(start + 1);
    }
    lines
        .take_while(|(_, l)| {
            let t = l.trim_start();
            t.is_empty() || t.starts_with('#') || indent(l) >= fields
        })
        .find(|(_, l)| sets(l))
        .map(|(i, _)| i + 1)
}

/// The first `key:` with no value at or after line `from` (1-based): a
/// block key with nothing after it (and no nested block under it), or a
/// flow-map member `key: ~` / `key: null` / `key:` before `,` or `}`.
fn key_without_value(text: &str, from: usize) -> Option<(usize, String)> {
    static MEMBER: std::sync::LazyLock<Option<regex::Regex>> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"(?:^|[{,\s])([A-Za-z_][\w-]*):[ \t]*(?:~|null)?[ \t]*(?:[,}]|#.*$|$)")
            .ok()
    });
    let member = MEMBER.as_ref()?;
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    for (i, raw) in lines.iter().enumerate().skip(from.saturating_sub(1)) {
        let l = raw.trim_start().trim_start_matches("- ");
        for c in member.captures_iter(l) {
            let (Some(all), Some(key)) = (c.get(0), c.get(1)) else {
                continue;
            };
            let at_line_end = !all.as_str().trim_end().ends_with([',', '}']);
            if at_line_end {
                // `usage:` with a nested block under it has a value.
                let next = lines
                    .iter()
                    .skip(i + 1)
                    .find(|n| !n.trim().is_empty() && !n.trim_start().starts_with('#'));
                if next.is_some_and(|n| indent(n) > indent(raw)) {
                    continue;
                }
            }
            return Some((i + 1, key.as_str().to_string()));
        }
    }
    None
}

/// The top-level sections alone, each optional: to check one section of the
/// file without the others.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "deserialized only for its errors")]
struct RawSections {
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    providers: Option<Vec<RawProvider>>,
    #[serde(default)]
    tenants: Option<Vec<RawTenant>>,
    #[serde(default)]
    admin: Option<RawAdmin>,
    #[serde(default)]
    decision_log: Option<String>,
    #[serde(default)]
    max_body: Option<ByteSize>,
    #[serde(default)]
    state: Option<RawState>,
}

/// Every structural error of `text`, not only the first (`first`): serde
/// stops at the first wrong field, so each top-level section, and each entry
/// of `providers:` and `tenants:`, is deserialized on its own and its errors
/// located in the whole file. `None` when that cannot be trusted and `first`
/// stands alone: the YAML itself is broken, an anchor is used across
/// sections, or the sections do not find `first` again.
fn section_errors(file: &str, text: &str, first: &ConfigError) -> Option<Vec<ConfigError>> {
    serde_yaml::from_str::<serde_yaml::Value>(text).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let is_key = |l: &str| {
        !l.is_empty()
            && !l.starts_with(|c: char| {
                c.is_whitespace() || matches!(c, '#' | '-' | '.' | '}' | ']')
            })
    };
    let starts: Vec<usize> = (0..lines.len())
        .filter(|i| lines.get(*i).is_some_and(|l| is_key(l)))
        .collect();
    let mut errors = Vec::new();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(lines.len());
        let section = lines.get(start..end)?;
        let section_text = section.join("\n");
        // A section cut where YAML does not allow it (a flow collection or
        // quoted scalar continued at column 0, an explicit `? key`) would
        // report errors the file does not have.
        serde_yaml::from_str::<serde_yaml::Value>(&section_text).ok()?;
        let Err(e) = serde_yaml::from_str::<RawSections>(&section_text) else {
            continue;
        };
        let key = section.first()?.split(':').next().unwrap_or("").trim();
        let entries = match key {
            "providers" | "tenants" => entry_errors(file, text, key, section, start)?,
            _ => Vec::new(),
        };
        if entries.is_empty() {
            errors.push(located(file, text, &e, start));
        } else {
            errors.extend(entries);
        }
    }
    let trusted = errors
        .iter()
        .any(|e| e.line == first.line && e.message == first.message)
        && !errors
            .iter()
            .any(|e| e.message.contains("anchor") || e.message.contains("alias"));
    if !trusted {
        return None;
    }
    errors.sort_by_key(|e| (e.line, e.column));
    errors.dedup_by(|a, b| a.line == b.line && a.message == b.message);
    Some(errors)
}

/// The errors of each entry of a block list `key:` (lines `section`, from
/// line `start + 1` of the file), each deserialized alone; `None` when an
/// entry cut out of the list is not YAML by itself.
fn entry_errors(
    file: &str,
    text: &str,
    key: &str,
    section: &[&str],
    start: usize,
) -> Option<Vec<ConfigError>> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_entry = |l: &str| {
        let t = l.trim_start();
        t == "-" || t.starts_with("- ")
    };
    let Some(first) = section.iter().skip(1).find(|l| is_entry(l)) else {
        return Some(Vec::new());
    };
    let depth = indent(first);
    let begins: Vec<usize> = (1..section.len())
        .filter(|i| {
            section
                .get(*i)
                .is_some_and(|l| is_entry(l) && indent(l) == depth)
        })
        .collect();
    let mut out = Vec::new();
    for (n, &b) in begins.iter().enumerate() {
        let end = begins.get(n + 1).copied().unwrap_or(section.len());
        let Some(entry) = section.get(b..end) else {
            continue;
        };
        let doc = format!("{key}:\n{}", entry.join("\n"));
        serde_yaml::from_str::<serde_yaml::Value>(&doc).ok()?;
        if let Err(e) = serde_yaml::from_str::<RawSections>(&doc) {
            // Line 2 of `doc` is line `start + b + 1` of the file.
            let mut err = located(file, text, &e, start + b - 1);
            if let Some(rest) = err.message.strip_prefix(&format!("{key}[0]")) {
                err.message = format!("{key}[{n}]{rest}");
            }
            out.push(err);
        }
    }
    Some(out)
}

/// The 1-based line of the top-level `key:`.
fn key_line(text: &str, key: &str) -> Option<usize> {
    key_lines(text, key).next()
}

/// The 1-based lines of every top-level `key:`.
fn key_lines<'a>(text: &'a str, key: &'a str) -> impl Iterator<Item = usize> + 'a {
    text.lines().enumerate().filter_map(move |(i, l)| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
            .then_some(i + 1)
    })
}

/// The list entry an error path starts in, by its name: `tenants[2].attrs`
/// -> ("tenant `hobby`", "attrs"). The file is read leniently for the
/// names (everything else ignored), so this works while it has errors.
fn entry_of(text: &str, path: &str) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Names {
        #[serde(default)]
        providers: Vec<Named>,
        #[serde(default)]
        tenants: Vec<Named>,
    }
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        id: Option<String>,
    }
    let (list, rest) = path.split_once('[')?;
    let (index, field) = rest.split_once(']')?;
    let index: usize = index.parse().ok()?;
    let names: Names = serde_yaml::from_str(text).ok()?;
    let (what, name) = match list {
        "tenants" => ("tenant", names.tenants.into_iter().nth(index)?.id?),
        "providers" => ("provider", names.providers.into_iter().nth(index)?.name?),
        _ => return None,
    };
    Some((
        format!("{what} `{name}`"),
        field.trim_start_matches('.').to_string(),
    ))
}

/// `tenants[2].attrs: attribute `plan` is given twice: keep one` ->
/// `tenant `hobby`: attribute `plan` is given twice: keep one`.
fn name_entry(text: &str, message: String) -> String {
    if !message.ends_with(GIVEN_TWICE) {
        return message;
    }
    let named = message
        .split_once(": ")
        .and_then(|(path, rest)| Some((entry_of(text, path)?, rest)));
    match named {
        Some(((entry, _), rest)) => format!("{entry}: {rest}"),
        None => message,
    }
}

/// A key repeated in any mapping of `text`, which must deserialize as a
/// config (so every mapping the config's types do not check themselves is
/// plain data): serde_yaml's own `Mapping` refuses a repeat, located at the
/// start of its mapping.
fn repeated_key(file: &str, text: &str) -> Option<ConfigError> {
    let e = serde_yaml::from_str::<serde_yaml::Value>(text).err()?;
    let msg = strip_location(&e.to_string());
    let (path, repeat) = match msg.split_once(": duplicate entry") {
        Some((path, repeat)) => (path.to_string(), repeat),
        None => (String::new(), msg.strip_prefix("duplicate entry")?),
    };
    let key = match repeat.strip_prefix(" with key ") {
        Some(k) => format!("key `{}`", k.trim_matches('"')),
        None => "a key".to_string(),
    };
    let message = match entry_of(text, &path) {
        Some((entry, field)) if !field.is_empty() => {
            format!("{entry}: {key} in `{field}` {GIVEN_TWICE}")
        }
        Some((entry, _)) => format!("{entry}: {key} {GIVEN_TWICE}"),
        None if path.is_empty() => format!("{key} {GIVEN_TWICE}"),
        None => format!("{path}: {key} {GIVEN_TWICE}"),
    };
    Some(ConfigError {
        file: file.to_string(),
        line: e.location().map(|l| l.line()),
        column: e.location().map(|l| l.column()),
        message,
    })
}

/// serde_yaml appends " at line L column C"; we print the location ourselves.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
    /// Built at the first lookup.
    lines: std::cell::OnceCell<KeyLines<'a>>,
}

/// The 1-based lines of every `key: value` in a config's text, by key and
/// by key and value, read in one pass. Finding each tenant's line by
/// scanning the whole text made a config of 10,000 tenants take seconds.
struct KeyLines<'a> {
    /// Keys with their colon (`id:`).
    by_key: HashMap<&'a str, Vec<usize>>,
    by_key_value: HashMap<(&'a str, &'a str), Vec<usize>>,
}

impl<'a> KeyLines<'a> {
    fn of(text: &'a str) -> Self {
        let mut index = KeyLines {
            by_key: HashMap::new(),
            by_key_value: HashMap::new(),
        };
        for (i, line) in text.lines().enumerate() {
            let code = line.split(" #").next().unwrap_or("");
            let block = code.trim_start().trim_start_matches("- ");
            if !block.starts_with('{') {
                index.add(i + 1, block, false);
            }
            // A list entry written in flow style, `- { name: a, kind: mock }`
            // or several on one line (`tenants: [{ id: a, .. }, { id: b, .. }]`),
            // is found by its first key as a block entry is.
            for (at, _) in code.match_indices('{') {
                if let Some(inner) = code.get(at + 1..) {
                    index.add(i + 1, inner.trim_start(), true);
                }
            }
        }
        index
    }

    fn add(&mut self, line: usize, entry: &'a str, flow: bool) {
        let Some(colon) = entry.find(':') else {
            return;
        };
        let (Some(key), Some(rest)) = (entry.get(..=colon), entry.get(colon + 1..)) else {
            return;
        };
        let value = rest.split('#').next().unwrap_or("");
        let value = if flow {
            value.split([',', '}']).next().unwrap_or("")
        } else {
            value
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        self.by_key.entry(key).or_default().push(line);
        self.by_key_value
            .entry((key, value))
            .or_default()
            .push(line);
    }
}

impl Checker<'_> {
    /// A warning, located as errors are (`file:line: warning: ...`, or
    /// `file: warning: ...` when the line is not known).
    fn warn(&mut self, line: Option<usize>, message: String) {
        let w = ConfigError {
            file: self.file.to_string(),
            line,
            column: None,
            message,
        };
        self.warnings.push(w.as_warning());
    }

    fn error(&mut self, line: Option<usize>, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column: None,
            message,
        });
    }

    /// A top-level section's value; written with no value (`admin:` with
    /// its body commented out) is an error at its line, `default` saying
    /// what deleting the key gives instead.
    fn section<T>(&mut self, section: Section<T>, key: &str, default: &str) -> Option<T> {
        if matches!(section, Section::Empty) {
            self.error(
                key_line(self.text, key),
                format!("`{key}:` has no value: fill it in, or delete the key for the default ({default})"),
            );
        }
        section.given()
    }

    fn line_in_entry(&self, entry: Option<usize>, key: &str) -> Option<usize> {
        line_in_entry(self.text, entry, key)
    }

    /// The 1-based line of the first `key: value` (or `key:` when `value` is None).
    /// serde_yaml keeps no locations after deserializing, so semantic errors
    /// find their line by looking for the text that caused them.
    fn line_of(&self, key: &str, value: Option<&str>) -> Option<usize> {
        self.line_of_nth(key, value, 0)
    }

    /// As [`Checker::line_of`], the `nth` such line (0-based): a duplicate
    /// is reported where it is, not where the first one is.
    fn line_of_nth(&self, key: &str, value: Option<&str>, nth: usize) -> Option<usize> {
        let index = self.lines.get_or_init(|| KeyLines::of(self.text));
        let lines = match value {
            None => index.by_key.get(key),
            Some(v) => index.by_key_value.get(&(key, v)),
        };
        lines.and_then(|l| l.get(nth)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "OPENAI_KEY" => Some("sk-upstream".into()),
            "ADMIN" => Some("admin-secret".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse("gw.yaml", text, Path::new("/etc/rp"), &env)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    const GOOD: &str = "\
listen: 127.0.0.1:9000
policy: policies/saas
providers:
  - name: openai
    kind: openai
    base_url: http://127.0.0.1:1234/v1/
    api_key_env: OPENAI_KEY
  - name: mock
    kind: mock
    mock: { latency: 50ms, first_token: 10ms, error_rate: 0.25, usage: { completion_tokens: 5 } }
tenants:
  - id: demo
    key: sk-demo
    attrs: { plan: pro }
  - id: acme
    key_sha256: 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824
admin:
  token_env: ADMIN
max_body: 1MiB
";

    #[test]
    fn a_good_config_resolves_everything() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.policy, Path::new("/etc/rp/policies/saas"));
        assert_eq!(c.providers[0].base_url, "http://127.0.0.1:1234/v1");
        assert_eq!(
            c.providers[0].api_key.as_ref().unwrap().expose(),
            "sk-upstream"
        );
        assert_eq!(c.providers[1].mock.latency, Duration::from_millis(50));
        assert_eq!(c.providers[1].mock.first_token, Duration::from_millis(10));
        assert_eq!(c.providers[1].mock.completion_tokens, 5);
        assert_eq!(c.tenants[0].key_sha256, sha256("sk-demo"));
        assert_eq!(c.tenants[1].key_sha256, sha256("hello"));
        assert_eq!(c.line_of_tenant("acme"), Some(15));
        assert_eq!(c.admin_token_sha256, Some(sha256("admin-secret")));
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("gw.yaml:12: warning: tenant `demo` has a plain `key`"));
        // Located in a flow list on one line too, never at line 0.
        let c = parse("policy: p\ntenants: [{ id: a, key: ka }, { id: b, key: kb }]\n").unwrap();
        assert!(
            c.warnings[0].starts_with("gw.yaml:2: warning: tenant `a` has a plain `key`"),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings[1].starts_with("gw.yaml:2: warning: tenant `b` has a plain `key`"),
            "{:?}",
            c.warnings
        );
        assert!(
            !format!("{c:?}").contains("sk-upstream"),
            "secrets never print"
        );
    }

    #[test]
    fn a_state_file_where_the_watcher_looks_is_a_warning() {
        let base = "policy: policies/saas\nproviders: []\ntenants: [{ id: t, key_sha256: 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 }]\n";
        let warned = |state: &str| {
            let c = parse(&format!("{base}{state}")).unwrap();
            c.warnings
                .iter()
                .any(|w| w.contains("a directory the gateway watches"))
        };
        assert!(!warned(""), "the default has a directory of its own");
        assert!(warned("state: { backend: sqlite, path: state.db }\n"));
        assert!(warned(
            "state: { backend: sqlite, path: policies/saas/state.db }\n"
        ));
        assert!(warned(
            "state: { backend: sqlite, path: policies/state.db }\n"
        ));
        assert!(!warned("state: { backend: sqlite, path: var/state.db }\n"));
        assert!(!warned("state: { backend: memory }\n"));
    }

    #[cfg(unix)]
    #[test]
    fn a_parent_dir_after_a_symlink_is_where_the_link_leads() {
        let tmp = tempfile::tempdir().unwrap();
        let release = tmp.path().join("releases/v2");
        std::fs::create_dir_all(release.join("config")).unwrap();
        std::fs::create_dir_all(release.join("policy")).unwrap();
        std::os::unix::fs::symlink(release.join("config"), tmp.path().join("deploy")).unwrap();
        let p = normalize(&tmp.path().join("deploy/../policy"));
        assert_eq!(
            p.canonicalize().unwrap(),
            release.join("policy").canonicalize().unwrap()
        );
        // Without links, `..` is still taken away as text.
        assert_eq!(
            normalize(&tmp.path().join("releases/v2/config/../policy")),
            tmp.path().join("releases/v2/policy")
        );
        assert_eq!(normalize(Path::new("a/b/../c")), Path::new("a/c"));
    }

    #[test]
    fn every_error_names_file_line_and_problem() {
        let cases: &[(&str, &str, &str)] = &[
            ("policy: p\nlisten: 1.2.3.4:5\nprovders: []\n", "gw.yaml:3:1:", "unknown field `provders`"),
            ("policy: p\nproviders:\n  - name: a\n    kind: openia\n", "gw.yaml:4:11:", "unknown variant `openia`"),
            ("policy: p\nproviders:\n  - name: a\n    kind: openai\n    api_key_env: NOPE\n", "gw.yaml:5:", "environment variable `NOPE` (api_key_env) is not set"),
            ("policy: p\nproviders:\n  - name: a\n    kind: openai\n    base_url: ftp://x\n", "gw.yaml:5:", "invalid base_url `ftp://x`"),
            ("policy: p\nlisten: nowhere\n", "gw.yaml:2:", "invalid listen address `nowhere`"),
            ("policy: p\ntenants:\n  - id: a\n    key: k\n  - id: b\n    key: k\n", "gw.yaml:5:", "tenant `b` has the same key as tenant `a`"),
            ("policy: p\ntenants:\n  - id: a\n", "gw.yaml:3:", "missing `key_sha256`"),
            ("policy: p\ntenants:\n  - id: a\n    key_sha256: abc\n", "gw.yaml:4:", "must be 64 hex digits"),
            // Each tenant's own line, not the first `key_sha256:` of the file.
            ("policy: p\ntenants:\n  - id: a\n    key_sha256: abc\n  - id: b\n    key_sha256: xyz\n", "gw.yaml:6:", "tenant `b`: `key_sha256` must be 64 hex digits"),
            ("policy: p\nadmin:\n  token_env: UNSET\n", "gw.yaml:3:", "environment variable `UNSET` (admin token_env) is not set"),
            ("policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock: { latency: 5 parsecs }\n", "gw.yaml:5:", "invalid duration unit"),
            ("policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock:\n      error_rate: 2\n", "gw.yaml:6:", "error_rate must be between 0 and 1"),
            ("policy: p\nproviders:\n  - name: m\n    kind: mock\n  - name: m\n    kind: mock\n", "gw.yaml:5:", "duplicate provider `m`"),
            ("listen: 1.2.3.4:5\n", "gw.yaml", "missing field `policy`"),
            // Found by tests/gateway_bad_files.rs: a duplicate is reported
            // where it is, a refused value on its own line (not at 1:1), and
            // a public API without a key at load, not as a 401 per request.
            ("policy: p\ntenants:\n  - id: t\n    key: a\n  - id: t\n    key: b\n", "gw.yaml:5:", "duplicate tenant `t`"),
            ("policy: p\nlisten: 1.2.3.4:5\nmax_body: 10 parsecs\n", "gw.yaml:3:", "invalid size unit `parsecs`"),
            ("policy: p\nproviders:\n  - name: a\n    kind: openai\n", "gw.yaml:3:", "provider `a`: `https://api.openai.com/v1` needs an API key"),
            ("policy: p\nproviders:\n  - name: a\n    kind: anthropic\n", "gw.yaml:3:", "`https://api.anthropic.com/v1` needs an API key"),
            // Entries in flow style are located by their first key too.
            ("policy: p\nproviders:\n  - { name: m, kind: mock }\n  - {name: \"m\", kind: mock}\n", "gw.yaml:4:", "duplicate provider `m`"),
            ("policy: p\ntenants:\n  - { id: a, key: k }\n  - { id: b, key: k }\n", "gw.yaml:4:", "tenant `b` has the same key as tenant `a`"),
            // Several flow entries on one line: each is found on it.
            ("policy: p\ntenants: [{ id: a, key: k }, { id: b, key: k }]\n", "gw.yaml:2:", "tenant `b` has the same key as tenant `a`"),
            // A retention without a unit would be milliseconds: the whole ledger.
            ("policy: p\nstate:\n  backend: memory\n  ledger_retention: 90\n", "gw.yaml:4:", "ledger_retention `90` has no unit: write e.g. `90d` for days"),
            ("policy: p\nstate: { backend: memory, ledger_retention: 30min }\n", "gw.yaml:2:", "shorter than an hour"),
            ("policy: p\nstate: { backend: memory, ledger_retention: 3 weeks }\n", "gw.yaml:2:", "invalid duration unit `weeks`"),
        ];
        for (text, loc, msg) in cases {
            let errs = parse(text).unwrap_err();
            assert!(
                errs.iter().any(|e| e.starts_with(loc) && e.contains(msg)),
                "for {text:?} expected `{loc} ... {msg}`, got {errs:#?}"
            );
        }
    }

    /// The one error of `text`, whole.
    fn only_error(text: &str) -> String {
        let errs = parse(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{text:?}: {errs:#?}");
        errs.into_iter().next().unwrap()
    }

    const TENANT: &str = "tenants:\n  - id: t\n    key: k\n";

    #[test]
    fn a_key_given_twice_in_any_map_is_refused_where_it_repeats() {
        // Found by review: the last `plan` won, a free tenant got enterprise.
        for (text, want) in [
            (
                "policy: p\ntenants:\n  - id: hobby\n    key: k\n    attrs: { plan: free, plan: enterprise }\n",
                "gw.yaml:5:26: tenant `hobby`: attribute `plan` is given twice: keep one",
            ),
            (
                "policy: p\ntenants:\n  - id: a\n    key: k\n  - key: k2\n    attrs:\n      plan: free\n      seats: 3\n      plan: enterprise\n    id: hobby\n",
                "gw.yaml:9:7: tenant `hobby`: attribute `plan` is given twice: keep one",
            ),
            (
                "policy: p\nproviders:\n  - name: up\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n    models: { small: cheap-v1, big: big-v1, small: big-v1 }\n",
                "gw.yaml:6:45: provider `up`: model `small` is given twice: keep one",
            ),
            // A map inside an attribute's value (no policy type takes one,
            // but it must not slip through either).
            (
                "policy: p\ntenants:\n  - id: t\n    key: k\n    attrs: { plan: pro, limits: { a: 1, a: 2 } }\n",
                "gw.yaml:5:33: tenant `t`: key `a` in `attrs.limits` is given twice: keep one",
            ),
            // Fixed keys were already refused by serde.
            (
                "policy: p\nmax_body: 1MiB\nmax_body: 2MiB\n",
                "gw.yaml:3:1: duplicate field `max_body`",
            ),
        ] {
            assert_eq!(only_error(text), want, "{text:?}");
        }
        let c = parse(&format!(
            "policy: p\n{TENANT}    attrs: {{ plan: free, tags: [a, a] }}\n"
        ))
        .unwrap();
        assert_eq!(c.tenants[0].attrs["plan"], "free");
    }

    #[test]
    fn a_section_written_without_a_value_is_an_error_not_the_default() {
        // Found by review: with its body commented out, each of these
        // started cleanly with the default (no admin, no tenants, ...).
        for (text, want) in [
            (
                "policy: p\nadmin:\n  # token_env: ADMIN\n",
                "gw.yaml:2: `admin:` has no value: fill it in, or delete the key for the default (the admin endpoints are off)",
            ),
            (
                "policy: p\nstate: ~\n",
                "gw.yaml:2: `state:` has no value: fill it in, or delete the key for the default (SQLite in `routeplane-state/state.db`)",
            ),
            (
                "policy: p\ndecision_log:\n",
                "gw.yaml:2: `decision_log:` has no value: fill it in, or delete the key for the default (no decision log)",
            ),
            (
                "policy: p\nmax_body: null\n",
                "gw.yaml:2: `max_body:` has no value: fill it in, or delete the key for the default (32MiB)",
            ),
            (
                "policy: p\nlisten:\n",
                "gw.yaml:2: `listen:` has no value: fill it in, or delete the key for the default (listen on 127.0.0.1:8080)",
            ),
            (
                "policy: p\nproviders:\n",
                "gw.yaml:2: `providers:` has no value: fill it in, or delete the key for the default (no providers)",
            ),
            ("policy:\n", "gw.yaml:1: `policy:` has no value: name the policy directory or file"),
            (
                "policy: p\ntenants:\n#  - id: t\n#    key: k\n",
                "gw.yaml:2: `tenants:` has no value: list the tenants; a gateway without tenants refuses every request (401)",
            ),
            (
                "policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock:\n      latency:\n      chunks: 2\n",
                "gw.yaml:6: providers[0].mock: `latency:` has no value: fill it in, or delete the key for the default",
            ),
            (
                "policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock: { latency: ~, chunks: 2 }\n",
                "gw.yaml:5: providers[0].mock: `latency:` has no value: fill it in, or delete the key for the default",
            ),
            (
                "policy: p\nadmin: { token_env: ~ }\ndecision_log: d.jsonl\n",
                "gw.yaml:2: admin: `token_env:` has no value: fill it in, or delete the key for the default",
            ),
            (
                "policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock:\n      usage:\n        prompt_tokens: 3\n      latency:\n",
                "gw.yaml:8: providers[0].mock: `latency:` has no value: fill it in, or delete the key for the default",
            ),
            (
                "policy: p\nproviders:\n  - name: o\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n    models: { a: ~ }\n",
                "gw.yaml:6:13: providers[0].models: an upstream model id is empty: give the id the provider knows the model by, or delete the entry",
            ),
            (
                "policy: p\ntenants:\n  - id: t\n    key:   # set me\n",
                "gw.yaml:4: tenants[0]: `key:` has no value: fill it in, or delete the key for the default",
            ),
            (
                "policy: p\ntenants: []\n",
                "gw.yaml:2: `tenants:` lists no tenant: a gateway without tenants refuses every request (401)",
            ),
            (
                "policy: p\ntenants:\n  - id: t\n    key: k\n    attrs:\n",
                "gw.yaml:5: tenant `t`: `attrs:` has no value: fill it in, or delete the key for the policy's defaults",
            ),
            (
                "policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock:\n",
                "gw.yaml:5: provider `m`: `mock:` has no value: fill it in, or delete the key for the defaults",
            ),
            (
                "policy: p\nproviders:\n  - kind: mock\n    name: m\n    models: ~\n",
                "gw.yaml:5: provider `m`: `models:` has no value: fill it in, or delete the key to send the policy's model names",
            ),
            (
                "policy: p\ndecision_log: ''\n",
                "gw.yaml:2: `decision_log:` is empty: name a file, or delete the key for no decision log",
            ),
        ] {
            let text = if text.contains("tenants") || text.starts_with("policy:\n") {
                text.to_string()
            } else {
                format!("{text}{TENANT}")
            };
            let errs = parse(&text).unwrap_err();
            assert!(errs.iter().any(|e| e == want), "{text:?}: want {want}, got {errs:#?}");
        }
        // Absent keys still mean the default; no `tenants:` at all is a warning.
        let c = parse("policy: p\n").unwrap();
        assert!(c.admin_token_sha256.is_none());
        assert_eq!(
            c.warnings,
            ["gw.yaml: warning: no `tenants:`: a gateway without tenants refuses every request (401)"]
        );
    }

    #[test]
    fn meaningless_values_are_refused() {
        for (text, want) in [
            (
                "policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock: { chunks: 0 }\n",
                "gw.yaml:5: provider `m`: `chunks` must be at least 1, got 0",
            ),
            (
                "policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock:\n      latency: 10ms\n      first_token: 1.5s\n",
                "gw.yaml:7: provider `m`: `first_token` (1.5s) is later than `latency` (10ms), the time to the whole answer: raise `latency` or lower `first_token`",
            ),
            (
                "policy: p\nproviders:\n  - name: m\n    kind: mock\n    api_key_env: OPENAI_KEY\n",
                "gw.yaml:5: provider `m`: a mock provider takes no API key: delete `api_key_env`",
            ),
            (
                "policy: p\ntenants:\n  - id: ''\n    key: k\n",
                "gw.yaml:3: a tenant's `id` is empty: give each tenant a name (it appears in logs, budgets and the policy's errors)",
            ),
            (
                "policy: p\nproviders:\n  - name:\n    kind: mock\n",
                "gw.yaml:3: a provider's `name` is empty: give the name the policy uses for it",
            ),
        ] {
            let text = if text.contains("tenants") { text.to_string() } else { format!("{text}{TENANT}") };
            assert_eq!(only_error(&text), want, "{text:?}");
        }
        // The line is the one in this provider's entry, not the first in the file.
        let two = format!("policy: p\nproviders:\n  - name: a\n    kind: mock\n    mock: {{ chunks: 2 }}\n  - name: b\n    kind: mock\n    mock: {{ chunks: 0 }}\n{TENANT}");
        assert!(only_error(&two).starts_with("gw.yaml:8: provider `b`"));
        // `first_token` alone: the answer takes that long.
        let c = parse(&format!("policy: p\nproviders:\n  - name: m\n    kind: mock\n    mock: {{ first_token: 20ms }}\n{TENANT}")).unwrap();
        assert_eq!(c.providers[0].mock.latency, Duration::from_millis(20));
    }

    #[test]
    fn every_structural_error_is_reported_in_one_run() {
        let text = "policy: p\nprovders: []\nproviders:\n  - name: a\n    kind: openia\n  - name: b\n    kind: mock\n    bogus: 1\n\
                    tenants:\n  - id: t\n    key: k\n    extra: x\nmax_body: 10 parsecs\nstate: { backend: sqlite, pth: x }\n";
        let errs = parse(text).unwrap_err();
        let expected = [
            "gw.yaml:2:1: unknown field `provders`",
            "gw.yaml:5:11: providers[0].kind: unknown variant `openia`",
            "gw.yaml:8:5: providers[1]: unknown field `bogus`",
            "gw.yaml:12:5: tenants[0]: unknown field `extra`",
            "gw.yaml:13: invalid size unit `parsecs`",
            "gw.yaml:14:27: state: unknown field `pth`",
        ];
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        for (e, want) in errs.iter().zip(expected) {
            assert!(e.starts_with(want), "expected `{want}`, got {errs:#?}");
        }
    }

    #[test]
    fn when_sections_cannot_be_read_alone_the_first_error_stands_alone() {
        // An alias into another section, broken YAML, flow style: one error,
        // the one serde found, never a wrong one.
        for (text, want) in [
            (
                "a: &x { name: m, kind: mock }\npolicy: p\nproviders:\n  - *x\n  - name: q\n    kind: bad\n",
                "gw.yaml:1:1: unknown field `a`",
            ),
            ("policy: p\nbogus: [\nother: 1\n", "gw.yaml:"),
            (
                "{policy: p, bogus: 1, providers: [{name: a, kind: nope}]}\n",
                "gw.yaml:1:",
            ),
            // Valid YAML that cannot be cut at column 0: a flow list and a
            // quoted scalar continued there, an explicit key.
            (
                "policy: p\nbogus: 1\ntenants: [\n{id: t, key: k},\n]\n",
                "gw.yaml:2:1: unknown field `bogus`",
            ),
            (
                "policy: p\nbogus: 1\nlisten: \"0.0.0.0:\n8080\"\n",
                "gw.yaml:2:1: unknown field `bogus`",
            ),
            ("bogus: 1\n? policy\n: p\n", "gw.yaml:1:1: unknown field `bogus`"),
        ] {
            let errs = parse(text).unwrap_err();
            assert_eq!(errs.len(), 1, "{text:?}: {errs:#?}");
            assert!(errs[0].starts_with(want), "{text:?}: {errs:#?}");
        }
    }

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.yaml");
        let c = Config::load_with_env(&path, &env).unwrap();
        assert!(c
            .tenants
            .iter()
            .any(|t| t.id == "demo" && t.key_sha256 == sha256("sk-demo")));
        assert!(c
            .tenants
            .iter()
            .any(|t| t.id == "acme-eu" && t.key_sha256 == sha256("sk-acme-eu")));
        assert_eq!(c.admin_token_sha256, Some(sha256("admin-demo")));
        assert!(c.providers.iter().all(|p| p.kind == ProviderKind::Mock));
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        let kept = |text: &str| parse(text).unwrap().ledger_retention;
        assert_eq!(kept("policy: p\n"), None);
        assert_eq!(
            kept("policy: p\nstate: { backend: memory, ledger_retention: 90d }\n"),
            Some(Duration::from_secs(90 * 86_400))
        );
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_size("10MiB").unwrap(), 10 * 1024 * 1024);
        assert!(parse_size("1TB").is_err());
    }

    #[test]
    fn deep_flow_nesting_is_refused_at_once_with_its_place() {
        // 100,000 nested `[` kept the YAML parser busy for minutes.
        let deep = format!(
            "policy: p\ndeep: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let t0 = std::time::Instant::now();
        let errs = parse(&deep).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("gw.yaml:2:135: `[` and `{` nested deeper than 128 levels"),
            "{errs:?}"
        );
        // Brackets in comments and quoted strings do not count; 128 levels do not trip it.
        for ok in [
            format!("# {}\n", "[".repeat(500)),
            format!("a: '{}'\n", "{".repeat(500)),
            format!("a: \"\\\" {}\"\n", "[".repeat(500)),
            format!("a: {}{}\n", "[".repeat(128), "]".repeat(128)),
        ] {
            assert_eq!(too_deep(&ok), None, "{ok}");
        }
        assert_eq!(too_deep(&format!("a: {}", "{".repeat(129))), Some((1, 132)));
    }

    #[test]
    fn only_a_regular_file_is_read_as_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.ends_with("cannot read the config file: it is a directory"),
            "{err}"
        );
        // Reading a named pipe waited for a writer forever (at start, and a
        // reload stuck on it held every later reload).
        let fifo = dir.path().join("gateway.yaml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = Config::load(&fifo).unwrap_err().to_string();
            assert!(err.ends_with("it is not a regular file"), "{err}");
        }
    }
}
