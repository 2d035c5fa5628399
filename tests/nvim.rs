//! End to end with a real editor: headless Neovim (installed by
//! `scripts/install-test-deps.sh`) opens a broken policy, starts
//! `routeplane lsp`, and writes back the diagnostics it received.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn neovim_receives_the_servers_diagnostics() {
    let Ok(nvim) = which("nvim") else {
        panic!(
            "nvim is not installed: run `scripts/install-test-deps.sh` (the test suite needs it)"
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("broken.route");
    std::fs::write(
        &policy,
        "provider openai { region us }\nmodel mini {\n  provider openai\n  kind chat\n}\n\
         classify {\n  chat otherwise\n}\nroute chat {\n  candidats [mini]\n}\n",
    )
    .unwrap();
    let out = dir.path().join("diagnostics.txt");
    let init = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nvim/init.lua");
    let mut child = Command::new(nvim)
        .args(["--headless", "--clean", "-n"])
        .arg(&policy)
        .args(["-c", &format!("luafile {init}")])
        .env("ROUTEPLANE_BIN", env!("CARGO_BIN_EXE_routeplane"))
        .env("ROUTEPLANE_OUT", &out)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("neovim did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&out).expect("neovim wrote no diagnostics file");
    let lines: Vec<&str> = text.lines().collect();
    assert!(!text.contains("TIMEOUT"), "{text}");
    let syntax = lines
        .iter()
        .find(|l| l.contains("route::syntax"))
        .unwrap_or_else(|| panic!("no syntax error in {lines:?}"));
    // Line 10, column 3 is `candidats`; severity 1 is an error.
    assert!(syntax.starts_with("10:3:1:route::syntax:"), "{syntax}");
    assert!(syntax.contains("did you mean `candidates`?"), "{syntax}");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
