//! Golden tests of `routeplane check`, run as the real binary: exit codes and
//! every output format. Policies come from `tests/ui/` (each one documents
//! what it contains) or are written to a temporary directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const CLEAN: &str = "tests/ui/clean.route";
const CLEAN_DIR: &str = "tests/ui/clean_two_files";
/// One syntax error (a misspelt property).
const SYNTAX: &str = "tests/ui/syntax_misspelt_property.route";
/// Only a warning (`unused-model`).
const WARNING: &str = "tests/ui/lint_unused_model.route";
/// One error in each of two files.
const TWO_FILES: &str = "tests/ui/cross_file_errors";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn check_in(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_routeplane"))
        .arg("check")
        .args(args)
        .current_dir(dir)
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn check(args: &[&str]) -> Run {
    check_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn json(args: &[&str]) -> (i32, Value) {
    let run = check(args);
    let v = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.stdout));
    (run.code, v)
}

// ---------------------------------------------------------------- exit codes

#[test]
fn a_clean_policy_exits_0() {
    let run = check(&[CLEAN, CLEAN_DIR]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stdout, "ok: no problems in 2 policies\n");
    assert_eq!(check(&["--deny-warnings", CLEAN]).code, 0);
}

#[test]
fn errors_exit_1() {
    let run = check(&[SYNTAX]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(
        check(&[CLEAN, SYNTAX]).code,
        1,
        "one bad policy fails the run"
    );
}

#[test]
fn warnings_exit_0_unless_denied() {
    let run = check(&[WARNING]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.ends_with("warning: 1 warning in 1 policy\n"),
        "{}",
        run.stdout
    );
    let denied = check(&["--deny-warnings", WARNING]);
    assert_eq!(denied.code, 1);
    assert!(
        denied
            .stdout
            .ends_with("error: 1 warning in 1 policy (warnings denied)\n"),
        "{}",
        denied.stdout
    );
}

#[test]
fn io_and_usage_errors_exit_2() {
    let missing = check(&["tests/ui/does-not-exist"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stdout.is_empty());
    assert!(
        missing
            .stderr
            .starts_with("error[route::io]: cannot read `tests/ui/does-not-exist`"),
        "{}",
        missing.stderr
    );

    let empty = tempfile::tempdir().unwrap();
    let run = check(&[empty.path().to_str().unwrap()]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("error[route::no-policy]: no `.route` files found under"),
        "{}",
        run.stderr
    );

    for args in [
        &["--format", "xml", CLEAN][..],
        &["--color", "sometimes", CLEAN],
        &["--no-such-flag"],
    ] {
        let run = check(args);
        assert_eq!(run.code, 2, "{args:?}");
        assert!(run.stderr.contains("error:"), "{}", run.stderr);
    }
}

#[test]
fn io_errors_keep_machine_output_clean() {
    for format in ["json", "github", "sarif"] {
        let run = check(&["--format", format, "tests/ui/does-not-exist"]);
        assert_eq!(run.code, 2);
        assert!(run.stdout.is_empty(), "{format}: {}", run.stdout);
    }
}

#[test]
fn the_default_path_is_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let none = check_in(tmp.path(), &[]);
    assert_eq!(none.code, 2);
    assert!(none.stderr.contains("`policies/`"), "{}", none.stderr);

    let policies = tmp.path().join("policies/startup");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::copy(manifest(SYNTAX), policies.join("main.route")).unwrap();
    let run = check_in(tmp.path(), &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("policies/startup/main.route:6:"),
        "{}",
        run.stdout
    );
}

fn manifest(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

// ---------------------------------------------------------------- human

#[test]
fn human_output_is_rustc_like() {
    let run = check(&["--color", "never", SYNTAX]);
    let expected = "\
error[route::syntax]: expected a model property (`provider`, `kind`, `context`, `max_output`, `price`, `caps`, `region`, `tier`, `quality`, `tokenizer`, `enabled`, `disabled`, `labels`) or `}`, found `provder`
   ╭─[tests/ui/syntax_misspelt_property.route:6:12]
 5 │ model gpt-4o { provider openai  kind chat  quality 0.9 }
 6 │ model o1 { provder openai  kind chat }
   ·            ───┬───
   ·               ╰── unexpected `provder`
 7 │ classify { chat otherwise }
   ╰────
  help: did you mean `provider`?

error: 1 error in 1 policy
";
    assert_eq!(run.stdout, expected);
}

#[test]
fn human_output_covers_every_file() {
    let run = check(&["--color", "never", TWO_FILES]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("[tests/ui/cross_file_errors/catalogue.route:"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("[tests/ui/cross_file_errors/routes.route:"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.ends_with("in 1 policy\n"), "{}", run.stdout);
}

#[test]
fn color_follows_the_flag_and_the_terminal() {
    // Not a terminal here, so `auto` means no color.
    assert!(!check(&[SYNTAX]).stdout.contains('\u{1b}'));
    assert!(!check(&["--color", "never", SYNTAX])
        .stdout
        .contains('\u{1b}'));
    let colored = check(&["--color", "always", SYNTAX]);
    assert!(colored.stdout.contains("\u{1b}["), "{}", colored.stdout);
    assert_eq!(colored.code, 1);
}

// ---------------------------------------------------------------- json

#[test]
fn json_is_one_document_with_locations_and_a_summary() {
    let (code, v) = json(&["--format", "json", SYNTAX, CLEAN_DIR]);
    assert_eq!(code, 1);
    assert_eq!(v["version"], 1);
    assert_eq!(v["ok"], false);
    assert_eq!(v["summary"]["errors"], 1);
    assert_eq!(v["summary"]["warnings"], 0);
    assert_eq!(v["summary"]["policies"], 2);
    assert_eq!(v["policies"][0]["path"], SYNTAX);
    assert_eq!(v["policies"][1]["errors"], 0);
    let diags = v["diagnostics"].as_array().unwrap();
    assert_eq!(diags.len(), 1);
    let d = &diags[0];
    assert_eq!(d["file"], SYNTAX);
    assert_eq!(d["policy"], SYNTAX);
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(6), Some(12))
    );
    assert_eq!(
        (d["end_line"].as_u64(), d["end_column"].as_u64()),
        (Some(6), Some(19))
    );
    assert_eq!(d["code"], "route::syntax");
    assert_eq!(d["severity"], "error");
    assert!(d["message"].as_str().unwrap().ends_with("found `provder`"));
    assert_eq!(d["help"], "did you mean `provider`?");
    assert_eq!(d["lint"], Value::Null);
    assert_eq!(d["labels"][0]["primary"], true);
    assert_eq!(d["labels"][0]["message"], "unexpected `provder`");
    assert_eq!(d["suggestion"]["replacement"], "provider");
}

#[test]
fn json_reports_lints_by_name() {
    let (code, v) = json(&["--format", "json", WARNING]);
    assert_eq!(code, 0);
    assert_eq!(v["ok"], true);
    let d = &v["diagnostics"][0];
    assert_eq!(d["severity"], "warning");
    assert_eq!(d["lint"], "unused-model");
    assert_eq!(d["code"], "route::unused-model");
    let (code, v) = json(&["--format", "json", "--deny-warnings", WARNING]);
    assert_eq!((code, &v["ok"]), (1, &Value::Bool(false)));
}

#[test]
fn json_of_a_clean_run() {
    let (code, v) = json(&["--format", "json", CLEAN_DIR]);
    assert_eq!(code, 0);
    assert_eq!(v["ok"], true);
    assert_eq!(v["diagnostics"], Value::Array(vec![]));
    assert_eq!(v["summary"]["files"], 2);
    assert_eq!(v["policies"][0]["files"].as_array().unwrap().len(), 2);
}

// ---------------------------------------------------------------- github

#[test]
fn github_prints_workflow_commands() {
    let run = check(&["--format", "github", SYNTAX]);
    assert_eq!(run.code, 1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stdout);
    assert_eq!(
        lines[0],
        "::error file=tests/ui/syntax_misspelt_property.route,line=6,col=12,endLine=6,endColumn=19,\
         title=route%3A%3Asyntax::expected a model property (`provider`, `kind`, `context`, `max_output`, \
         `price`, `caps`, `region`, `tier`, `quality`, `tokenizer`, `enabled`, `disabled`, `labels`) or `}`, \
         found `provder`%0Ahelp: did you mean `provider`?"
    );
    let warn = check(&["--format", "github", WARNING]);
    assert!(
        warn.stdout
            .starts_with("::warning file=tests/ui/lint_unused_model.route,line="),
        "{}",
        warn.stdout
    );
    assert!(
        warn.stdout.contains(",title=route%3A%3Aunused-model::"),
        "{}",
        warn.stdout
    );
    assert_eq!(check(&["--format", "github", CLEAN]).stdout, "");
}

// ---------------------------------------------------------------- sarif

/// The structural rules of SARIF 2.1.0 that code scanning relies on.
fn assert_valid_sarif(v: &Value) {
    assert_eq!(v["version"], "2.1.0");
    assert!(v["$schema"]
        .as_str()
        .unwrap()
        .contains("sarif-schema-2.1.0.json"));
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let driver = &runs[0]["tool"]["driver"];
    assert_eq!(driver["name"], "routeplane");
    let rules = driver["rules"].as_array().unwrap();
    let ids: Vec<&str> = rules.iter().map(|r| r["id"].as_str().unwrap()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert!(!ids[i + 1..].contains(id), "duplicate rule {id}");
    }
    for r in rules {
        let level = r["defaultConfiguration"]["level"].as_str().unwrap();
        assert!(["error", "warning", "note", "none"].contains(&level));
    }
    for result in runs[0]["results"].as_array().unwrap() {
        let id = result["ruleId"].as_str().unwrap();
        let index = result["ruleIndex"].as_u64().unwrap() as usize;
        assert_eq!(ids[index], id, "ruleIndex points at ruleId");
        assert!(["error", "warning", "note", "none"].contains(&result["level"].as_str().unwrap()));
        assert!(!result["message"]["text"].as_str().unwrap().is_empty());
        let locations = result["locations"].as_array().into_iter().flatten();
        let related = result["relatedLocations"].as_array().into_iter().flatten();
        for loc in locations.chain(related) {
            let phys = &loc["physicalLocation"];
            let uri = phys["artifactLocation"]["uri"].as_str().unwrap();
            assert!(!uri.contains(' ') && !uri.starts_with('/'), "{uri}");
            let region = &phys["region"];
            let (sl, sc) = (
                region["startLine"].as_u64().unwrap(),
                region["startColumn"].as_u64().unwrap(),
            );
            let (el, ec) = (
                region["endLine"].as_u64().unwrap(),
                region["endColumn"].as_u64().unwrap(),
            );
            assert!(
                sl >= 1 && sc >= 1 && el >= sl && ec >= 1,
                "regions are 1-based: {region}"
            );
            assert!(el > sl || ec >= sc, "{region}");
        }
    }
}

#[test]
fn sarif_is_valid_and_lists_every_rule() {
    let (code, v) = json(&["--format", "sarif", SYNTAX, WARNING, TWO_FILES]);
    assert_eq!(code, 1);
    assert_valid_sarif(&v);
    let run = &v["runs"][0];
    let rules: Vec<&str> = run["tool"]["driver"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for code in [
        "route::syntax",
        "route::unknown-model",
        "route::coverage-hole",
        "route::unused-model",
        "route::disabled-candidate",
    ] {
        assert!(rules.contains(&code), "{code}");
    }
    let results = run["results"].as_array().unwrap();
    assert!(results.len() >= 4, "{results:#?}");
    let first = &results[0];
    assert_eq!(first["ruleId"], "route::syntax");
    assert_eq!(first["level"], "error");
    let loc = &first["locations"][0]["physicalLocation"];
    assert_eq!(loc["artifactLocation"]["uri"], SYNTAX);
    assert_eq!(loc["artifactLocation"]["uriBaseId"], "%SRCROOT%");
    assert_eq!(loc["region"]["startLine"], 6);
    assert_eq!(loc["region"]["startColumn"], 12);
    let lint = results
        .iter()
        .find(|r| r["ruleId"] == "route::unused-model")
        .unwrap();
    assert_eq!(lint["level"], "warning");
}

#[test]
fn sarif_of_a_clean_run_has_no_results() {
    let (code, v) = json(&["--format", "sarif", CLEAN_DIR]);
    assert_eq!(code, 0);
    assert_valid_sarif(&v);
    assert_eq!(v["runs"][0]["results"], Value::Array(vec![]));
}

#[test]
fn invalid_utf8_in_a_string_or_comment_is_an_error() {
    // Latin-1 `é` in a string parsed as U+FFFD: `check` said ok, and the
    // condition could never match.
    let dir = tempfile::tempdir().unwrap();
    let text = b"request { feature: string }\nprovider p { region us }\nmodel m { provider p kind chat }\nmodel k { provider p kind chat }\nclassify {\n  fr when request.feature == \"caf\xe9\" // latin-1\n  chat otherwise\n}\nroute fr { candidates [k, m] }\nroute chat { candidates [m, k] }\n";
    std::fs::write(dir.path().join("a.route"), text).unwrap();
    let run = check_in(dir.path(), &["--format", "json", "a.route"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    let d = &v["diagnostics"][0];
    assert_eq!(d["message"], "`a.route` is not valid UTF-8", "{v:#}");
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(6), Some(34)),
        "{v:#}"
    );
}

#[test]
fn columns_on_the_first_line_do_not_count_a_byte_order_mark() {
    // Editors do not show the BOM Notepad writes first; a column that
    // counted it pointed one character to the right of the mistake.
    let dir = tempfile::tempdir().unwrap();
    let text = "\u{feff}provder p { region us }\n";
    std::fs::write(dir.path().join("a.route"), text).unwrap();
    let run = check_in(dir.path(), &["--format", "json", "a.route"]);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    let d = &v["diagnostics"][0];
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(1), Some(1)),
        "{v:#}"
    );
    let human = check_in(dir.path(), &["a.route"]);
    assert!(human.stdout.contains("a.route:1:1"), "{}", human.stdout);
}

#[test]
fn a_lone_carriage_return_is_one_line_break_in_every_format() {
    // An old Mac file ends its lines with a lone `\r`: its first comment ran
    // to the end of the file (no models, said `check`), and the human report
    // counted lines that JSON did not (4:135 against 1:135).
    let dir = tempfile::tempdir().unwrap();
    let text = "// old Mac\rprovider openai { region us }\rmodel gpt-4o { provider openai kind chat }\rclassify { chat otherwise }\rroute chat { candidates [gpt-4o, nope] }\r";
    std::fs::write(dir.path().join("a.route"), text).unwrap();
    let run = check_in(dir.path(), &["--format", "json", "a.route"]);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    let codes: Vec<&str> = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["code"].as_str())
        .collect();
    assert_eq!(codes, ["route::unknown-model"], "{v:#}");
    let d = &v["diagnostics"][0];
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(5), Some(34)),
        "{v:#}"
    );
    let human = check_in(dir.path(), &["a.route"]);
    assert!(human.stdout.contains("a.route:5:34]"), "{}", human.stdout);
    // The source line is drawn alone, without the line before it glued on.
    assert!(
        human
            .stdout
            .contains(" 5 │ route chat { candidates [gpt-4o, nope] }\n"),
        "{}",
        human.stdout
    );
    let github = check_in(dir.path(), &["--format", "github", "a.route"]);
    assert!(
        github.stdout.contains(",line=5,col=34,"),
        "{}",
        github.stdout
    );
    let sarif = check_in(dir.path(), &["--format", "sarif", "a.route"]);
    let v: Value = serde_json::from_str(&sarif.stdout).unwrap();
    let region = &v["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"];
    assert_eq!(
        (region["startLine"].as_u64(), region["startColumn"].as_u64()),
        (Some(5), Some(34)),
        "{v:#}"
    );
}
