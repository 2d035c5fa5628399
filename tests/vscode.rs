//! The VS Code extension builds, type-checks, passes its grammar test and
//! packages into a `.vsix` (npm comes from the machine; packages from the
//! npm registry, pinned by package-lock.json).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn npm(dir: &Path, args: &[&str]) {
    let out = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run npm ({e}); install Node.js and npm"));
    assert!(
        out.status.success(),
        "npm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_extension_builds_and_packages_into_a_vsix() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("editors/vscode");
    let vsix = dir.join("routeplane.vsix");
    let _ = std::fs::remove_file(&vsix);
    npm(&dir, &["ci", "--no-audit", "--no-fund"]);
    npm(&dir, &["test"]);
    npm(&dir, &["run", "package"]);
    let size = std::fs::metadata(&vsix)
        .expect("no routeplane.vsix was written")
        .len();
    assert!(
        size > 10_000,
        "the .vsix is suspiciously small: {size} bytes"
    );
    // A .vsix is a zip: check that the bundle and the grammar are inside.
    let bytes = std::fs::read(&vsix).unwrap();
    let has = |name: &str| bytes.windows(name.len()).any(|w| w == name.as_bytes());
    assert!(
        has("extension/out/extension.js"),
        "bundle missing from the .vsix"
    );
    assert!(
        has("extension/syntaxes/routeplane.tmLanguage.json"),
        "grammar missing from the .vsix"
    );
    std::fs::remove_file(&vsix).unwrap();
}
