//! Decision tests: `*.test.yaml` files next to a policy's `.route` files.
//!
//! ```yaml
//! tenants:                      # optional: named tenants, by id
//!   acme-eu: { plan: pro, region: eu, data_residency: true }
//! cases:
//!   - name: eu_tenants_stay_in_the_eu
//!     tenant: acme-eu           # an id from `tenants`, or { id: x, attrs: { .. } }
//!     request:                  # RequestFeatures fields, and/or `body:` (an OpenAI body)
//!       feature: code-review
//!       input_tokens: 2000
//!     stats:                    # optional live stats per model
//!       gpt-4o-mini: { latency_ms: 900, success_rate: 0.4, breaker: open }
//!     budget: downgrade         # optional: warn | confirm_premium | downgrade | block,
//!                               # or the thresholds reached: [confirm_premium, downgrade]
//!     expect:
//!       intent: code
//!       first: mistral-medium
//!       order: [mistral-medium, mistral-small]
//!       never: [gpt-5]          # none of these may appear
//!       denied: model-denied    # a denial code (see `Denial::code`)
//!       rule: eu_residency      # the constraint named by the denial
//! ```
//!
//! The runner compiles each policy once, resolves each case's tenant with
//! [`CompiledPolicy::tenant`] and checks [`decide`]'s result.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::compile::{compile, CompiledPolicy};
use crate::decide::{decide, BreakerState, Decision, ModelStats, RequestFeatures, Stats};
use crate::ir::{BudgetAction, Endpoint, ModelId, ResponseFormat};
use crate::load;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    #[serde(default)]
    pub tenants: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub tenant: TenantSpec,
    #[serde(default)]
    pub request: RequestSpec,
    #[serde(default)]
    pub stats: BTreeMap<String, ModelStats>,
    #[serde(default)]
    pub budget: Thresholds,
    pub expect: Expect,
}

/// The budget thresholds a case (or `explain --stats`) has reached: one
/// action, or several (`[confirm_premium, downgrade]`: past a downgrade,
/// premium models still need the confirmation).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "OneOrMany")]
pub struct Thresholds(pub Vec<BudgetAction>);

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(BudgetAction),
    Many(Vec<BudgetAction>),
}

impl From<OneOrMany> for Thresholds {
    fn from(v: OneOrMany) -> Self {
        match v {
            OneOrMany::One(a) => Thresholds(vec![a]),
            OneOrMany::Many(v) => Thresholds(v),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TenantSpec {
    Id(String),
    Inline {
        #[serde(default = "default_tenant_id")]
        id: String,
        #[serde(default)]
        attrs: serde_json::Map<String, serde_json::Value>,
    },
}

fn default_tenant_id() -> String {
    "test-tenant".into()
}

/// Request fields; each one set overrides what `body` gives.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub endpoint: Option<Endpoint>,
    pub body: Option<serde_json::Value>,
    pub response_format: Option<ResponseFormat>,
    pub has_tools: Option<bool>,
    pub has_images: Option<bool>,
    pub stream: Option<bool>,
    pub input_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    pub feature: Option<String>,
    pub prompt: Option<String>,
    pub model: Option<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, serde_json::Value>,
    pub confirmed: Option<bool>,
}

impl RequestSpec {
    pub fn features(&self) -> RequestFeatures {
        let endpoint = self.endpoint.unwrap_or(Endpoint::Chat);
        let mut f = match &self.body {
            Some(b) => RequestFeatures::from_openai_json(endpoint, b),
            None => RequestFeatures {
                endpoint,
                ..RequestFeatures::default()
            },
        };
        macro_rules! set {
            ($($field:ident),*) => {$( if let Some(v) = &self.$field { f.$field = v.clone().into(); } )*};
        }
        set!(
            response_format,
            has_tools,
            has_images,
            stream,
            input_tokens,
            prompt,
            confirmed
        );
        if let Some(v) = self.max_tokens {
            f.max_tokens = Some(v);
        }
        if let Some(v) = &self.feature {
            f.feature = Some(v.clone());
        }
        if let Some(v) = &self.model {
            f.model = Some(v.clone());
        }
        for (k, v) in &self.meta {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            f.meta.retain(|(x, _)| x != k);
            f.meta.push((k.clone(), v));
        }
        f
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub intent: Option<String>,
    pub first: Option<String>,
    pub order: Option<Vec<String>>,
    #[serde(default)]
    pub never: Vec<String>,
    /// A denial code, or `none` for an allowed request.
    pub denied: Option<String>,
    pub rule: Option<String>,
}

/// Live stats given by model name.
pub struct CaseStats<'a> {
    pub by_model: Vec<ModelStats>,
    /// The strongest threshold reached.
    pub budget: Option<BudgetAction>,
    /// A `confirm premium` threshold is among those reached.
    pub confirm_premium: bool,
    _p: std::marker::PhantomData<&'a ()>,
}

impl<'a> CaseStats<'a> {
    pub fn new(
        p: &'a CompiledPolicy,
        stats: &BTreeMap<String, ModelStats>,
        budget: &Thresholds,
    ) -> Result<Self, String> {
        let mut by_model = vec![ModelStats::default(); p.policy().models.len()];
        for (name, s) in stats {
            let m = p
                .model_by_name(name)
                .ok_or_else(|| format!("stats for unknown model `{name}`"))?;
            // Scores take these as they are: a success rate of 7 outweighed
            // every other signal, a negative latency beat every real one.
            if s.success_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                return Err(format!(
                    "stats for `{name}`: `success_rate` must be between 0 and 1"
                ));
            }
            for (key, v) in [
                ("latency_ms", s.latency_ms),
                ("first_token_ms", s.first_token_ms),
            ] {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(format!(
                        "stats for `{name}`: `{key}` must be a number of milliseconds, 0 or more"
                    ));
                }
            }
            if let Some(slot) = by_model.get_mut(m.index()) {
                *slot = *s;
            }
        }
        Ok(CaseStats {
            by_model,
            budget: budget.0.iter().copied().max(),
            confirm_premium: budget.0.contains(&BudgetAction::ConfirmPremium),
            _p: std::marker::PhantomData,
        })
    }
}

impl Stats for CaseStats<'_> {
    fn model(&self, m: ModelId) -> ModelStats {
        self.by_model.get(m.index()).copied().unwrap_or(ModelStats {
            breaker: BreakerState::Closed,
            ..ModelStats::default()
        })
    }
    fn budget_action(&self) -> Option<BudgetAction> {
        self.budget
    }
    fn premium_needs_confirmation(&self) -> bool {
        self.confirm_premium
    }
}

/// The outcome of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    /// `policy::case`.
    pub name: String,
    pub file: String,
    /// Empty when the case passed.
    pub failures: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Errors that stop a run before any case (unreadable files).
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(transparent)]
    Load(#[from] load::LoadError),
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn test_files(dir: &Path) -> Result<Vec<PathBuf>, TestError> {
    let io = |e| TestError::Io {
        path: dir.display().to_string(),
        source: e,
    };
    let mut out = Vec::new();
    if dir.is_file() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_file()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Runs every `*.test.yaml` next to every policy under the paths.
pub fn run_paths(paths: &[PathBuf]) -> Result<Vec<CaseResult>, TestError> {
    let mut results = Vec::new();
    for policy in load::discover(paths)? {
        let files = test_files(&policy.root)?;
        if files.is_empty() {
            continue;
        }
        let suite = policy
            .root
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("policy")
            .to_string();
        let compiled = compile(&policy.sources);
        // A case is reported by name: two of one name would read as one.
        let mut named: HashMap<String, String> = HashMap::new();
        for file in files {
            let fname = file.display().to_string();
            let text = std::fs::read_to_string(&file).map_err(|e| TestError::Io {
                path: fname.clone(),
                source: e,
            })?;
            let parsed: TestFile = match serde_yaml::from_str(&text) {
                Ok(t) => t,
                Err(e) => {
                    results.push(CaseResult {
                        name: format!("{suite}::<file>"),
                        file: fname.clone(),
                        failures: vec![format!("invalid test file: {e}")],
                    });
                    continue;
                }
            };
            for case in &parsed.cases {
                let mut failures = match &compiled {
                    Ok(p) => run_case(p, &parsed, case),
                    Err(a) => {
                        let n = a.errors().count();
                        vec![format!(
                            "the policy does not compile ({n} errors; run `routeplane check`)"
                        )]
                    }
                };
                match named.get(&case.name) {
                    Some(first) => failures.push(format!(
                        "another case of this policy is named `{}` (in {first}): give each case its own name",
                        case.name
                    )),
                    None => {
                        named.insert(case.name.clone(), fname.clone());
                    }
                }
                results.push(CaseResult {
                    name: format!("{suite}::{}", case.name),
                    file: fname.clone(),
                    failures,
                });
            }
        }
    }
    Ok(results)
}

/// Runs one case; returns what did not match.
pub fn run_case(p: &CompiledPolicy, file: &TestFile, case: &Case) -> Vec<String> {
    let (id, attrs) = match &case.tenant {
        TenantSpec::Id(id) => match file.tenants.get(id) {
            Some(a) => (id.clone(), a.clone()),
            None => {
                return vec![format!(
                    "unknown tenant `{id}` (declare it under `tenants:`)"
                )]
            }
        },
        TenantSpec::Inline { id, attrs } => (id.clone(), attrs.clone()),
    };
    let tenant = match p.tenant(&id, &attrs) {
        Ok(t) => t,
        Err(errs) => return errs,
    };
    let stats = match CaseStats::new(p, &case.stats, &case.budget) {
        Ok(s) => s,
        Err(e) => return vec![e],
    };
    // A body the gateway refuses with a 400 is never routed: a decision
    // asserted for it would pass here and never happen (explain refuses it too).
    if let Some(body) = &case.request.body {
        let endpoint = case.request.endpoint.unwrap_or(Endpoint::Chat);
        if let Err(e) = crate::gateway::validate::body(endpoint, body) {
            return vec![format!("the gateway would refuse this request (400): {e}")];
        }
    }
    let r = case.request.features();
    let declared = |k: &str| p.policy().request_attrs.iter().any(|a| a.name == k);
    let undeclared: Vec<String> = case
        .request
        .meta
        .keys()
        .filter(|k| !declared(k))
        .map(|k| {
            format!("request attribute `{k}` is not declared: add it to a `request {{ }}` block or remove it from the test")
        })
        .collect();
    if !undeclared.is_empty() {
        return undeclared;
    }
    if let Err(e) = r.check_declared(p) {
        return vec![e];
    }
    let d = decide(p, &tenant, &r, &stats);
    check(p, &d, &case.expect)
}

fn check(p: &CompiledPolicy, d: &Decision, e: &Expect) -> Vec<String> {
    let mut f = Vec::new();
    // `expect: {}` (or a misplaced key) checked nothing, and the case passed.
    if e.intent.is_none()
        && e.first.is_none()
        && e.order.is_none()
        && e.never.is_empty()
        && e.denied.is_none()
        && e.rule.is_none()
    {
        f.push(
            "`expect` checks nothing: give at least one of `intent`, `first`, `order`, `never`, `denied`, `rule`"
                .to_string(),
        );
    }
    let names: Vec<&str> = d.attempts.iter().map(|m| p.model_name(*m)).collect();
    let outcome = match &d.outcome {
        Ok(()) => "none".to_string(),
        Err(x) => x.code().to_string(),
    };
    let got_intent = d.intent.map(|i| p.intent_name(i));
    if let Some(want) = &e.intent {
        if got_intent != Some(want.as_str()) {
            f.push(format!(
                "intent: expected `{want}`, got `{}`",
                got_intent.unwrap_or("-")
            ));
        }
    }
    for m in e
        .first
        .iter()
        .chain(e.order.iter().flatten())
        .chain(e.never.iter())
    {
        if p.model_by_name(m).is_none() {
            f.push(format!("the test names unknown model `{m}`"));
        }
    }
    if let Some(want) = &e.first {
        if names.first() != Some(&want.as_str()) {
            f.push(format!(
                "first: expected `{want}`, got `{}`",
                names.first().unwrap_or(&"-")
            ));
        }
    }
    if let Some(want) = &e.order {
        if names != *want {
            f.push(format!(
                "order: expected [{}], got [{}]",
                want.join(", "),
                names.join(", ")
            ));
        }
    }
    for m in &e.never {
        if names.contains(&m.as_str()) {
            f.push(format!(
                "never: `{m}` is in the order [{}]",
                names.join(", ")
            ));
        }
    }
    let want_denied = e
        .denied
        .as_deref()
        .or(e.rule.as_ref().map(|_| "model-denied"));
    match want_denied {
        Some(want) if want != outcome => {
            let msg = d
                .outcome
                .as_ref()
                .err()
                .map(|x| format!(": {}", x.message(p)))
                .unwrap_or_default();
            f.push(format!("denial: expected `{want}`, got `{outcome}`{msg}"));
        }
        None if d.outcome.is_err() && e.first.is_some() => {
            let msg = d
                .outcome
                .as_ref()
                .err()
                .map(|x| x.message(p))
                .unwrap_or_default();
            f.push(format!("unexpected denial: {msg}"));
        }
        _ => {}
    }
    if let Some(want) = &e.rule {
        let got = d
            .outcome
            .as_ref()
            .err()
            .and_then(|x| x.rule())
            .map(|r| p.constraint_name(r));
        if got != Some(want.as_str()) {
            f.push(format!(
                "rule: expected `{want}`, got `{}`",
                got.unwrap_or("-")
            ));
        }
    }
    f
}

/// `cargo test`-style report.
pub fn render_human(results: &[CaseResult]) -> String {
    let mut out = String::new();
    let n = results.len();
    let _ = writeln!(out, "\nrunning {n} test{}", if n == 1 { "" } else { "s" });
    for r in results {
        let _ = writeln!(
            out,
            "test {} ... {}",
            r.name,
            if r.passed() { "ok" } else { "FAILED" }
        );
    }
    let failed: Vec<&CaseResult> = results.iter().filter(|r| !r.passed()).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nfailures:");
        for r in &failed {
            let _ = writeln!(out, "\n---- {} ({}) ----", r.name, r.file);
            for m in &r.failures {
                let _ = writeln!(out, "  {m}");
            }
        }
        let _ = writeln!(out, "\nfailures:");
        for r in &failed {
            let _ = writeln!(out, "    {}", r.name);
        }
    }
    let passed = results.len() - failed.len();
    let _ = writeln!(
        out,
        "\ntest result: {}. {passed} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len()
    );
    out
}

pub fn render_json(results: &[CaseResult]) -> String {
    let failed = results.iter().filter(|r| !r.passed()).count();
    let doc = serde_json::json!({
        "tests": results.iter().map(|r| serde_json::json!({
            "name": r.name, "file": r.file, "ok": r.passed(), "failures": r.failures,
        })).collect::<Vec<_>>(),
        "summary": { "passed": results.len() - failed, "failed": failed },
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

fn xml_escape(s: &str) -> String {
    s.chars()
        // XML 1.0 has no way to write these, not even escaped: a case named
        // with a control character made the whole report unreadable.
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => '\u{fffd}',
            _ => c,
        })
        .collect::<String>()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn render_junit(results: &[CaseResult]) -> String {
    let failed = results.iter().filter(|r| !r.passed()).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"routeplane\" tests=\"{}\" failures=\"{failed}\">",
        results.len()
    );
    let mut suites: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        let suite = r.name.split("::").next().unwrap_or("policy");
        suites.entry(suite).or_default().push(r);
    }
    for (suite, cases) in suites {
        let f = cases.iter().filter(|r| !r.passed()).count();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\">",
            xml_escape(suite),
            cases.len()
        );
        for r in cases {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}\" file=\"{}\"",
                xml_escape(suite),
                xml_escape(&r.name),
                xml_escape(&r.file)
            );
            if r.passed() {
                let _ = writeln!(out, "/>");
            } else {
                let msg = xml_escape(&r.failures.join("; "));
                let _ = writeln!(
                    out,
                    ">\n      <failure message=\"{msg}\">{msg}</failure>\n    </testcase>"
                );
            }
        }
        let _ = writeln!(out, "  </testsuite>");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_of_cases_is_singular_for_one() {
        let case = |name: &str| CaseResult {
            name: name.into(),
            file: "t.test.yaml".into(),
            failures: Vec::new(),
        };
        assert!(render_human(&[case("a")]).starts_with("\nrunning 1 test\n"));
        assert!(render_human(&[case("a"), case("b")]).starts_with("\nrunning 2 tests\n"));
    }

    #[test]
    fn junit_is_well_formed_whatever_the_names() {
        let r = CaseResult {
            name: "p::a <b> & \"c\" \u{1}".into(),
            file: "t.test.yaml".into(),
            failures: vec!["intent: expected `x\u{7}`, got `chat`".into()],
        };
        let out = render_junit(&[r]);
        assert!(
            !out.chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r')),
            "{out}"
        );
        assert!(
            out.contains("name=\"p::a &lt;b&gt; &amp; &quot;c&quot; \u{fffd}\""),
            "{out}"
        );
    }
}
