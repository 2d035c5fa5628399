//! `routeplane usage --config FILE [--by tenant|feature|model|day] [--since DATE]
//! [--format table|json|csv]`: requests, tokens, estimated and actual cost per
//! group, read straight from the spend ledger of the config's `state:` backend
//! (after moving into it what a killed gateway left in its ledger spool).

use std::collections::BTreeMap;
use std::path::PathBuf;

use routeplane::budget::dollars;
use routeplane::config::Config;
use routeplane::state::{self, period, LedgerEntry};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Tenant,
    Feature,
    Model,
    Day,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(clap::Args)]
pub struct Args {
    /// The gateway configuration (YAML) whose `state:` holds the ledger
    #[arg(long, short, default_value = "routeplane.yaml")]
    pub config: PathBuf,
    /// Group by
    #[arg(long, value_enum, default_value = "tenant")]
    pub by: By,
    /// Only entries on or after this day (`YYYY-MM-DD`, UTC)
    #[arg(long)]
    pub since: Option<String>,
    /// Output format
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// One group's totals; costs in micro-dollars.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Row {
    /// `None` is the requests sent with no feature tag (`--by feature`): kept
    /// apart from every name, since a feature tag can be any string, even
    /// `(none)`. JSON writes it `null`, CSV an empty field, the table `(none)`.
    pub group: Option<String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub estimated_micros: u64,
    pub actual_micros: u64,
}

pub fn group(entries: &[LedgerEntry], by: By) -> Vec<Row> {
    // `None` sorts first: the untagged requests lead the feature table.
    let mut rows: BTreeMap<Option<String>, Row> = BTreeMap::new();
    for e in entries {
        let key = match by {
            By::Tenant => Some(e.tenant.clone()),
            By::Feature => e.feature.clone(),
            By::Model => Some(e.model.clone()),
            By::Day => Some(period::format_date(e.ts_ms)),
        };
        let r = rows.entry(key.clone()).or_insert_with(|| Row {
            group: key,
            ..Row::default()
        });
        r.requests += 1;
        r.input_tokens = r.input_tokens.saturating_add(e.input_tokens);
        r.output_tokens = r.output_tokens.saturating_add(e.output_tokens);
        r.estimated_micros = r.estimated_micros.saturating_add(e.estimated);
        r.actual_micros = r.actual_micros.saturating_add(e.actual);
    }
    rows.into_values().collect()
}

fn by_name(by: By) -> &'static str {
    match by {
        By::Tenant => "tenant",
        By::Feature => "feature",
        By::Model => "model",
        By::Day => "day",
    }
}

/// The group column of a CSV row: the untagged requests are an empty field,
/// and a feature tag that is the empty string (`metadata.feature: ""`) is a
/// quoted one, so the two stay apart.
fn csv_group(group: Option<&str>) -> String {
    match group {
        None => String::new(),
        Some("") => "\"\"".to_string(),
        Some(name) => csv_field(name),
    }
}

fn csv_field(s: &str) -> String {
    // RFC 4180 quotes a CR too: a feature tag from a request body's metadata
    // can hold one, and unquoted it split the row for CSV readers.
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// What the table shows for the untagged requests and for the sum of all rows.
const TABLE_NO_FEATURE: &str = "(none)";
const TABLE_TOTAL: &str = "total";

/// The group column of a table row. A name that reads like one of the table's
/// own words (`(none)`, `total`), starts with a quote, or holds whitespace or
/// control characters (which would shift or split the columns) is shown
/// quoted and escaped, so every cell means one thing.
fn table_group(group: Option<&str>) -> String {
    let Some(name) = group else {
        return TABLE_NO_FEATURE.to_string();
    };
    let ambiguous = name.is_empty()
        || name == TABLE_NO_FEATURE
        || name == TABLE_TOTAL
        || name.starts_with('"')
        || name.chars().any(|c| c.is_whitespace() || c.is_control());
    match ambiguous {
        true => format!("{name:?}"),
        false => name.to_string(),
    }
}

pub fn render(rows: &[Row], by: By, format: Format) -> String {
    let head = [
        by_name(by),
        "requests",
        "input_tokens",
        "output_tokens",
        "estimated",
        "actual",
    ];
    match format {
        Format::Json => {
            #[derive(Serialize)]
            struct Out<'a> {
                by: &'static str,
                groups: &'a [Row],
            }
            serde_json::to_string_pretty(&Out {
                by: by_name(by),
                groups: rows,
            })
            .map(|s| s + "\n")
            .unwrap_or_default()
        }
        Format::Csv => {
            let mut out = head.join(",") + "\n";
            for r in rows {
                out += &format!(
                    "{},{},{},{},{},{}\n",
                    csv_group(r.group.as_deref()),
                    r.requests,
                    r.input_tokens,
                    r.output_tokens,
                    dollars(r.estimated_micros).trim_start_matches('$'),
                    dollars(r.actual_micros).trim_start_matches('$'),
                );
            }
            out
        }
        Format::Table => {
            let mut cells: Vec<[String; 6]> = vec![head.map(str::to_string)];
            let total = rows.iter().fold(Row::default(), |mut t, r| {
                t.requests += r.requests;
                t.input_tokens += r.input_tokens;
                t.output_tokens += r.output_tokens;
                t.estimated_micros += r.estimated_micros;
                t.actual_micros += r.actual_micros;
                t
            });
            let groups = rows
                .iter()
                .map(|r| table_group(r.group.as_deref()))
                .chain(std::iter::once(TABLE_TOTAL.to_string()));
            for (group, r) in groups.zip(rows.iter().chain(std::iter::once(&total))) {
                cells.push([
                    group,
                    r.requests.to_string(),
                    r.input_tokens.to_string(),
                    r.output_tokens.to_string(),
                    dollars(r.estimated_micros),
                    dollars(r.actual_micros),
                ]);
            }
            let mut widths = [0usize; 6];
            for row in &cells {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let mut out = String::new();
            for row in &cells {
                let mut line = String::new();
                for (i, (w, c)) in widths.iter().zip(row).enumerate() {
                    if i == 0 {
                        line += &format!("{c:<w$}");
                    } else {
                        line += &format!("  {c:>w$}");
                    }
                }
                out += line.trim_end();
                out.push('\n');
            }
            out
        }
    }
}

pub fn run(args: Args) -> u8 {
    // A config that cannot be read is an I/O error (2); one that is invalid is 1.
    if let Err(e) = std::fs::metadata(&args.config) {
        eprintln!("routeplane: cannot read `{}`: {e}", args.config.display());
        return 2;
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let since = match args.since.as_deref() {
        None => None,
        Some(s) => match period::parse_date(s) {
            Some(ms) => Some(ms),
            None => {
                eprintln!("routeplane: `--since {s}` is not a date (YYYY-MM-DD)");
                return 2;
            }
        },
    };
    if let state::Backend::Sqlite(path) = &config.state {
        if !path.exists() {
            eprintln!(
                "routeplane: no ledger yet at `{}` (the gateway creates it on its first request)",
                path.display()
            );
            return 2;
        }
    }
    let store = match state::open(&config.state) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("routeplane: {e}");
            return 2;
        }
    };
    // Entries a gateway killed before its writer ran are still in its spool:
    // move what no running gateway holds into the store first.
    if let Some(dir) = store.spool_dir() {
        match state::spool::recover(&dir, &*store) {
            Ok(r) if r.entries > 0 => eprintln!(
                "routeplane: {} ledger entries recovered from `{}`",
                r.entries,
                dir.display()
            ),
            Ok(_) => {}
            Err(e) => eprintln!("routeplane: warning: the ledger spool was not read: {e}"),
        }
    }
    let entries = match store.ledger(since) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("routeplane: {e}");
            return 2;
        }
    };
    if !super::print_out(&render(&group(&entries, args.by), args.by, args.format)) {
        return 2;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tenant: &str, feature: Option<&str>, model: &str, ts_ms: i64, actual: u64) -> LedgerEntry {
        LedgerEntry {
            id: format!("{tenant}-{ts_ms}-{model}"),
            ts_ms,
            tenant: tenant.into(),
            feature: feature.map(str::to_string),
            model: model.into(),
            input_tokens: 10,
            output_tokens: 20,
            estimated: 100,
            actual,
        }
    }

    fn entries() -> Vec<LedgerEntry> {
        let day = 86_400_000;
        vec![
            e("demo", Some("chat"), "gpt-4o-mini", 0, 16),
            e("demo", None, "gpt-4o-mini", day, 16),
            e("capped", Some("chat"), "mistral-small", day + 5, 1_500_000),
        ]
    }

    #[test]
    fn groups_and_formats() {
        let rows = group(&entries(), By::Tenant);
        assert_eq!(
            render(&rows, By::Tenant, Format::Table),
            "\
tenant  requests  input_tokens  output_tokens  estimated     actual
capped         1            10             20    $0.0001      $1.50
demo           2            20             40    $0.0002  $0.000032
total          3            30             60    $0.0003  $1.500032
"
        );
        assert_eq!(
            render(&group(&entries(), By::Day), By::Day, Format::Csv),
            "\
day,requests,input_tokens,output_tokens,estimated,actual
1970-01-01,1,10,20,0.0001,0.000016
1970-01-02,2,20,40,0.0002,1.500016
"
        );
        let json: serde_json::Value = serde_json::from_str(&render(
            &group(&entries(), By::Feature),
            By::Feature,
            Format::Json,
        ))
        .unwrap();
        assert_eq!(json["by"], "feature");
        assert_eq!(json["groups"][0]["group"], serde_json::Value::Null);
        assert_eq!(json["groups"][1]["group"], "chat");
        assert_eq!(json["groups"][1]["requests"], 2);
        assert_eq!(json["groups"][1]["actual_micros"], 1_500_016);
        let models = group(&entries(), By::Model);
        assert_eq!(models.len(), 2);
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    #[test]
    fn no_feature_and_a_feature_named_none_stay_apart() {
        let entries = vec![
            e("demo", None, "gpt-4o-mini", 0, 1),
            e("demo", Some("(none)"), "gpt-4o-mini", 0, 2),
            e("demo", Some("total"), "gpt-4o-mini", 0, 4),
            e("demo", Some(""), "gpt-4o-mini", 0, 8),
        ];
        let rows = group(&entries, By::Feature);
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert_eq!(
            render(&rows, By::Feature, Format::Table),
            "\
feature   requests  input_tokens  output_tokens  estimated     actual
(none)           1            10             20    $0.0001  $0.000001
\"\"               1            10             20    $0.0001  $0.000008
\"(none)\"         1            10             20    $0.0001  $0.000002
\"total\"          1            10             20    $0.0001  $0.000004
total            4            40             80    $0.0004  $0.000015
"
        );
        assert_eq!(
            render(&rows, By::Feature, Format::Csv),
            "\
feature,requests,input_tokens,output_tokens,estimated,actual
,1,10,20,0.0001,0.000001
\"\",1,10,20,0.0001,0.000008
(none),1,10,20,0.0001,0.000002
total,1,10,20,0.0001,0.000004
"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&rows, By::Feature, Format::Json)).unwrap();
        let groups: Vec<&serde_json::Value> = json["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| &g["group"])
            .collect();
        assert_eq!(
            groups,
            [
                &serde_json::Value::Null,
                &serde_json::json!(""),
                &serde_json::json!("(none)"),
                &serde_json::json!("total"),
            ]
        );
    }

    #[test]
    fn csv_quotes_a_carriage_return() {
        assert_eq!(csv_field("a\rb"), "\"a\rb\"");
        assert_eq!(csv_field("ab"), "ab");
    }
}
