//! Golden tests of `routeplane fmt`: exit codes, what is written and what is listed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;

const MESSY: &str = "provider p{region us}\n\n\nmodel m { provider p kind chat } // main\n";
const CLEAN: &str =
    "provider p {\n  region us\n}\n\nmodel m { // main\n  provider p\n  kind chat\n}\n";

fn fmt(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_routeplane"))
        .arg("fmt")
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_lists_files_that_would_change_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policies/a");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("messy.route"), MESSY).unwrap();
    std::fs::write(dir.join("clean.route"), CLEAN).unwrap();
    std::fs::write(dir.join("notes.txt"), MESSY).unwrap();

    // The default path is `policies`.
    let (code, stdout, _) = fmt(tmp.path(), &["--check"]);
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        format!(
            "{}\n",
            Path::new("policies").join("a/messy.route").display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("messy.route")).unwrap(),
        MESSY
    );

    // Formatting rewrites in place, leaves no temporary file, and is then clean.
    let (code, stdout, stderr) = fmt(tmp.path(), &[]);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));
    assert_eq!(
        std::fs::read_to_string(dir.join("messy.route")).unwrap(),
        CLEAN
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        MESSY
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
    assert_eq!(fmt(tmp.path(), &["--check", "policies/a"]).0, 0);
}

#[test]
fn syntax_errors_and_missing_files_exit_2_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = "model a { provder p }\n";
    std::fs::write(tmp.path().join("broken.route"), broken).unwrap();
    std::fs::write(tmp.path().join("messy.route"), MESSY).unwrap();

    let (code, _, stderr) = fmt(tmp.path(), &["."]);
    assert_eq!(code, 2);
    assert!(stderr.contains("route::syntax"), "{stderr}");
    assert!(stderr.contains("broken.route:1:11"), "{stderr}");
    assert!(stderr.contains("did you mean `provider`?"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("broken.route")).unwrap(),
        broken
    );
    // The other files are still formatted.
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("messy.route")).unwrap(),
        CLEAN
    );

    let (code, _, stderr) = fmt(tmp.path(), &["--check", "missing"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read `missing`"), "{stderr}");
}

#[test]
fn invalid_utf8_is_refused_not_mangled() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = b"provider p { region us } // caf\xe9\n";
    std::fs::write(tmp.path().join("latin1.route"), bytes).unwrap();
    let (code, _, stderr) = fmt(tmp.path(), &["latin1.route"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    assert_eq!(
        std::fs::read(tmp.path().join("latin1.route")).unwrap(),
        bytes
    );
}

#[test]
fn the_example_policies_are_formatted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = fmt(root, &["--check", "policies"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn a_layout_change_that_would_unsilence_a_lint_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // The lint points at `b` inside the one-line route; the comment above it
    // silences that line, but formatting would move `b` two lines down.
    let text = "provider p {\n  region us\n}\n\nmodel a {\n  provider p\n  kind chat\n}\n\nmodel b {\n  provider p\n  kind chat\n  disabled\n}\n\nclassify {\n  chat otherwise\n}\n\n// allow(disabled-candidate)\nroute chat { candidates [a, b] }\n";
    std::fs::write(tmp.path().join("p.route"), text).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_routeplane"))
        .args(["check", "--deny-warnings", "."])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let (code, _, stderr) = fmt(tmp.path(), &["."]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("would change what `routeplane check` reports"),
        "{stderr}"
    );
    assert!(stderr.contains("disabled-candidate"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("p.route")).unwrap(),
        text
    );
}

#[cfg(unix)]
#[test]
fn a_symlink_loop_lists_each_file_once() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("p");
    std::fs::create_dir(&p).unwrap();
    std::fs::write(p.join("a.route"), MESSY).unwrap();
    // `self` -> `.`: the file was listed as p/a.route, self/p/a.route,
    // self/self/p/a.route, ... 41 times, and two such links never ended.
    std::os::unix::fs::symlink(".", tmp.path().join("self")).unwrap();
    let (code, out, err) = fmt(tmp.path(), &["--check", "."]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(out, "./p/a.route\n");
}

#[cfg(unix)]
#[test]
fn a_symlinked_file_is_formatted_where_it_leads() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("shared")).unwrap();
    std::fs::create_dir(tmp.path().join("p")).unwrap();
    std::fs::write(tmp.path().join("shared/real.route"), MESSY).unwrap();
    std::os::unix::fs::symlink("../shared/real.route", tmp.path().join("p/a.route")).unwrap();
    let (code, _, err) = fmt(tmp.path(), &["p"]);
    assert_eq!(code, 0, "{err}");
    // The link was replaced by a formatted copy, and the shared file left as it was.
    let link = std::fs::symlink_metadata(tmp.path().join("p/a.route")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("shared/real.route")).unwrap(),
        CLEAN
    );
}
