//! UI tests: every `tests/ui/*.route` file, and every `tests/ui/*/` directory
//! (a policy of several files), is analyzed and its human diagnostics (no
//! color) are snapshotted in `tests/snapshots/`.
//!
//! Each policy states what it is for on its first line:
//! `// expect: route::unknown-model, route::unknown-kind` or `// expect: clean`.
//! The set of codes emitted must be exactly that set, so a snapshot can never
//! quietly record the wrong diagnostic. Review new snapshots before accepting
//! them (`INSTA_UPDATE=always cargo test --test ui`, or `cargo insta review`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::path::Path;

use routeplane::analysis::analyze;
use routeplane::render::{Checked, Human, RULES};
use routeplane::source::Sources;

/// The policy at `path` with file names relative to `tests/ui`, so snapshots
/// do not depend on where the repository is checked out.
fn load(path: &Path) -> Sources {
    let base = path.parent().unwrap();
    let mut files: Vec<_> = if path.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "route"))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    let mut sources = Sources::new();
    for f in files {
        let name = f
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        sources.add(name, std::fs::read_to_string(&f).unwrap());
    }
    sources
}

/// The codes the policy's `// expect:` line names (empty for `clean`).
fn expected(sources: &Sources, path: &Path) -> BTreeSet<String> {
    let line = sources
        .iter()
        .find_map(|(_, f)| {
            f.text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("// expect:"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: the first line must be `// expect: <codes>` or `// expect: clean`",
                path.display()
            )
        });
    line.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "clean")
        .map(str::to_string)
        .collect()
}

#[test]
fn ui() {
    let mut wrong = Vec::new();
    insta::glob!("ui/*", |path| {
        if path.is_file() && path.extension().is_none_or(|e| e != "route") {
            return;
        }
        let sources = load(path);
        let analysis = analyze(&sources);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let checked = [Checked {
            name: &name,
            sources: &sources,
            diagnostics: &analysis.diagnostics,
        }];
        let rendered = Human::new(false).run(&checked, false);

        let emitted: BTreeSet<String> = analysis
            .diagnostics
            .iter()
            .map(|d| d.code.clone())
            .collect();
        let want = expected(&sources, path);
        if emitted != want {
            // Reported after the loop, so one run lists every mismatch.
            let message = format!("{name}: expected {want:?}, emitted {emitted:?}");
            eprintln!("{message}\n{rendered}");
            wrong.push(message);
        }

        insta::assert_snapshot!(rendered);
    });
    assert!(
        wrong.is_empty(),
        "codes differ from `// expect:` lines:\n{}",
        wrong.join("\n")
    );
}

/// Every code in the catalogue (the shared list of the brief) has a UI test,
/// and every code a UI test expects is in the catalogue (so SARIF describes it).
#[test]
fn every_code_has_a_ui_test() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let mut covered = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() || path.extension().is_some_and(|e| e == "route") {
            covered.extend(expected(&load(&path), &path));
        }
    }
    let catalogue: BTreeSet<String> = RULES.iter().map(|r| format!("route::{}", r.name)).collect();
    let untested: Vec<_> = catalogue.difference(&covered).collect();
    assert!(untested.is_empty(), "codes without a UI test: {untested:?}");
    let unlisted: Vec<_> = covered.difference(&catalogue).collect();
    assert!(
        unlisted.is_empty(),
        "codes missing from render::RULES: {unlisted:?}"
    );
}
