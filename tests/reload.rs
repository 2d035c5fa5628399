//! Hot reload of the real `routeplane serve`, seen from outside: what a
//! reload refuses, what it reports, and the deploys (symlink swaps, mounted
//! ConfigMaps) whose edits the file watcher must see.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/binary.rs"]
mod binary;

use std::path::Path;
use std::time::{Duration, Instant};

use binary::{http, POLICY};

const ADMIN: &str = "admin-secret-token";
const TENANT_KEY: &str = "sk-demo";
const ENVS: [(&str, &str); 1] = [("RP_ADMIN_TOKEN", ADMIN)];

/// The same policy with another version (the quality differs).
fn policy_with_quality(quality: &str) -> String {
    POLICY.replace("quality 0.5", &format!("quality {quality}"))
}

fn key_sha256(key: &str) -> String {
    hex::encode(routeplane::config::sha256(key))
}

/// A config for `POLICY`; `policy` is the `policy:` value, `extra` is
/// appended (more top-level sections).
fn config(policy: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
policy: {policy}
admin:
  token_env: RP_ADMIN_TOKEN
providers:
  - name: mock
    kind: mock
    mock: {{ latency: 1ms }}
tenants:
  - id: demo
    key_sha256: {}
{extra}",
        key_sha256(TENANT_KEY)
    )
}

/// A chat request with `key`: the status and the policy version that served it.
fn chat_as(addr: &str, key: &str) -> (u16, String) {
    let (status, policy, _) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        key,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#,
    );
    (status, policy)
}

/// The policy version serving a good request.
fn served_version(addr: &str) -> String {
    let (status, version) = chat_as(addr, TENANT_KEY);
    assert_eq!(status, 200);
    version
}

fn admin(addr: &str) -> serde_json::Value {
    binary::admin_policy(addr, ADMIN)
}

/// `POST /admin/reload`: the status and the answer.
fn admin_reload(addr: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = http(addr, "POST", "/admin/reload", ADMIN, "");
    (status, serde_json::from_str(&body).unwrap())
}

/// Wait up to 10 s for `cond`; the gateway's log in the failure message.
fn wait_for(server: &binary::Server, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The 1-based line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines().position(|l| l.starts_with(prefix)).unwrap() + 1
}

/// A gateway on `dir/gateway.yaml` and `dir/policy/main.route`.
fn start(dir: &Path, config_text: &str, extra_args: &[&str]) -> binary::Server {
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/main.route"), POLICY).unwrap();
    std::fs::write(dir.join("gateway.yaml"), config_text).unwrap();
    binary::Server::start(dir, &dir.join("gateway.yaml"), extra_args, &ENVS)
}

#[test]
fn changing_what_is_opened_once_at_start_is_refused_until_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = config(
        "policy",
        "state: { backend: memory }\ndecision_log: decisions.jsonl\n",
    );
    let server = start(dir, &good, &["--no-watch"]);
    let addr = server.addr.clone();
    let version = served_version(&addr);
    let yaml = dir.join("gateway.yaml");
    for (section, edited) in [
        (
            "state",
            good.replace(
                "state: { backend: memory }",
                "state: { backend: sqlite, path: st/state.db }",
            ),
        ),
        (
            "decision_log",
            good.replace("decisions.jsonl", "elsewhere.jsonl"),
        ),
        // The retention thread read it once at start.
        (
            "state",
            good.replace(
                "state: { backend: memory }",
                "state: { backend: memory, ledger_retention: 30d }",
            ),
        ),
    ] {
        std::fs::write(&yaml, &edited).unwrap();
        let (status, answer) = admin_reload(&addr);
        assert_eq!(status, 422, "{section}: {answer}");
        let diagnostics = answer["error"]["diagnostics"].to_string();
        // Located at the key, as the config's other errors are.
        let line = line_of(&edited, &format!("{section}:"));
        let expected = format!("gateway.yaml:{line}: changing `{section}` needs a restart");
        assert!(diagnostics.contains(&expected), "{section}: {answer}");
        // Visible as any failed reload, and the last good version serves on.
        let view = admin(&addr);
        assert_eq!(view["last_reload"]["ok"], false, "{view}");
        assert!(
            view["last_failure"].to_string().contains(&expected),
            "{view}"
        );
        assert_eq!(served_version(&addr), version);
        assert!(
            server.log().contains(&expected),
            "the refusal is logged:\n{}",
            server.log()
        );
    }
    // Nothing was opened at the edited places.
    assert!(!dir.join("st").exists());
    assert!(!dir.join("elsewhere.jsonl").exists());
    // Put back, the config reloads again.
    std::fs::write(&yaml, &good).unwrap();
    let (status, answer) = admin_reload(&addr);
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn the_same_policy_directory_written_another_way_is_not_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Started with a relative config path: `policy` resolves to `policy`,
    // relative to the working directory.
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/main.route"), POLICY).unwrap();
    std::fs::write(dir.join("gateway.yaml"), config("policy", "")).unwrap();
    let server = binary::Server::start(dir, Path::new("gateway.yaml"), &["--no-watch"], &ENVS);
    let addr = server.addr.clone();
    let version = served_version(&addr);
    // The same directory as an absolute path, with a policy edit.
    let absolute = dir
        .join("../")
        .join(dir.file_name().unwrap())
        .join("policy");
    std::fs::write(
        dir.join("gateway.yaml"),
        config(&absolute.display().to_string(), ""),
    )
    .unwrap();
    std::fs::write(dir.join("policy/main.route"), policy_with_quality("0.6")).unwrap();
    let (status, answer) = admin_reload(&addr);
    assert_eq!(status, 200, "{answer}");
    assert_ne!(served_version(&addr), version);
    // Another directory is still a change, refused at the `policy:` line.
    std::fs::create_dir_all(dir.join("other")).unwrap();
    std::fs::write(dir.join("other/main.route"), POLICY).unwrap();
    std::fs::write(dir.join("gateway.yaml"), config("other", "")).unwrap();
    let (status, answer) = admin_reload(&addr);
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]["diagnostics"]
            .to_string()
            .contains("gateway.yaml:2: changing `policy` needs a restart"),
        "{answer}"
    );
}

/// What kubelet does to update a mounted ConfigMap: the new files in a new
/// `..vN` directory, a temporary symlink renamed over `..data`, the old
/// directory deleted.
fn kubelet_update(cm: &Path, version: usize, gw_yaml: &str) {
    let new = cm.join(format!("..v{version}"));
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("gw.yaml"), gw_yaml).unwrap();
    std::os::unix::fs::symlink(format!("..v{version}"), cm.join("..data_tmp")).unwrap();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    std::fs::remove_dir_all(cm.join(format!("..v{}", version - 1))).unwrap();
}

#[test]
fn every_update_of_a_mounted_config_map_is_seen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/main.route"), POLICY).unwrap();
    // `cm/gw.yaml -> ..data/gw.yaml`, `..data -> ..v1`, as kubelet lays it out.
    let cm = dir.join("cm");
    std::fs::create_dir_all(cm.join("..v1")).unwrap();
    let tenant = |id: &str| {
        format!(
            "  - id: {id}\n    key_sha256: {}\n",
            key_sha256(&format!("sk-{id}"))
        )
    };
    let mut tenants = String::new();
    let with_tenants = |tenants: &str| {
        config(
            "../policy",
            &format!("{tenants}state: {{ backend: memory }}\n"),
        )
    };
    std::fs::write(cm.join("..v1/gw.yaml"), with_tenants(&tenants)).unwrap();
    std::os::unix::fs::symlink("..v1", cm.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gw.yaml", cm.join("gw.yaml")).unwrap();
    let server = binary::Server::start(dir, &cm.join("gw.yaml"), &[], &ENVS);
    let addr = server.addr.clone();
    served_version(&addr);
    // Each update adds a tenant; its key works once the update is loaded.
    // Before the fix the first was seen and the second never (the watch
    // stayed on the deleted `..v1`).
    for (version, id) in [(2, "second"), (3, "third"), (4, "fourth")] {
        assert_eq!(chat_as(&addr, &format!("sk-{id}")).0, 401);
        tenants.push_str(&tenant(id));
        kubelet_update(&cm, version, &with_tenants(&tenants));
        wait_for(&server, &format!("update {version} to be loaded"), || {
            chat_as(&addr, &format!("sk-{id}")).0 == 200
        });
    }
    assert_eq!(admin(&addr)["reloads"]["failed"], 0);
}

#[test]
fn a_policy_symlink_swapped_to_a_new_release_is_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (release, quality) in [("v1", "0.5"), ("v2", "0.6")] {
        std::fs::create_dir_all(dir.join("rel").join(release)).unwrap();
        std::fs::write(
            dir.join("rel").join(release).join("main.route"),
            policy_with_quality(quality),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("rel/v1", dir.join("current")).unwrap();
    std::fs::write(
        dir.join("gateway.yaml"),
        config("current", "state: { backend: memory }\n"),
    )
    .unwrap();
    let server = binary::Server::start(dir, &dir.join("gateway.yaml"), &[], &ENVS);
    let addr = server.addr.clone();
    let v1 = served_version(&addr);
    // `ln -s rel/v2 tmp && mv -T tmp current`: the release switch.
    std::os::unix::fs::symlink("rel/v2", dir.join("tmp")).unwrap();
    std::fs::rename(dir.join("tmp"), dir.join("current")).unwrap();
    wait_for(&server, "the swap to be loaded", || {
        served_version(&addr) != v1
    });
    let v2 = served_version(&addr);
    // An edit in the new release is seen: the watch moved with the symlink.
    std::fs::write(dir.join("rel/v2/main.route"), policy_with_quality("0.7")).unwrap();
    wait_for(&server, "an edit in the new release", || {
        served_version(&addr) != v2
    });
    // And one in the old release, no longer served, is not.
    let v3 = served_version(&addr);
    let reloads = admin(&addr)["reloads"]["succeeded"].clone();
    std::fs::write(dir.join("rel/v1/main.route"), policy_with_quality("0.8")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(admin(&addr)["reloads"]["succeeded"], reloads);
    assert_eq!(served_version(&addr), v3);
}

#[test]
fn a_provider_no_model_uses_is_a_warning_at_start_and_at_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let misspelt = "  - { name: mockk, kind: mock }\n";
    let good = config("policy", "state: { backend: memory }\n");
    let with_typo = good.replace("tenants:\n", &format!("{misspelt}tenants:\n"));
    let server = start(dir, &with_typo, &["--no-watch"]);
    let addr = server.addr.clone();
    let line = line_of(&with_typo, "  - { name: mockk");
    let expected = format!(
        "gateway.yaml:{line}: warning: provider `mockk` is not used by any model of the policy: did you mean `mock`?"
    );
    assert!(server.log().contains(&expected), "{}", server.log());
    let warnings = admin(&addr)["warnings"].to_string();
    assert!(warnings.contains(&expected), "{warnings}");
    // At reload too: a leftover provider added to the config.
    let leftover = "  - { name: retired, kind: mock }\n";
    let edited = with_typo.replace("tenants:\n", &format!("{leftover}tenants:\n"));
    std::fs::write(dir.join("gateway.yaml"), &edited).unwrap();
    let (status, answer) = admin_reload(&addr);
    assert_eq!(status, 200, "{answer}");
    let line = line_of(&edited, "  - { name: retired");
    let warnings = admin(&addr)["warnings"].to_string();
    assert!(
        warnings.contains(&format!(
            "gateway.yaml:{line}: warning: provider `retired` is not used by any model of the policy: delete it if it is left over"
        )),
        "{warnings}"
    );
    // Gone with the entries.
    std::fs::write(dir.join("gateway.yaml"), &good).unwrap();
    let (status, answer) = admin_reload(&addr);
    assert_eq!(status, 200, "{answer}");
    let warnings = admin(&addr)["warnings"].to_string();
    assert!(!warnings.contains("provider `"), "{warnings}");
}

#[test]
fn config_warnings_found_at_reload_are_logged_and_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let plain = |id: &str| format!("  - id: {id}\n    key: sk-{id}\n");
    let first = config(
        "policy",
        &format!("{}state: {{ backend: memory }}\n", plain("first")),
    );
    let server = start(dir, &first, &["--no-watch"]);
    let addr = server.addr.clone();
    let warning = |text: &str, id: &str| {
        format!(
            "gateway.yaml:{}: warning: tenant `{id}` has a plain `key`",
            line_of(text, &format!("  - id: {id}"))
        )
    };
    // At start: said once (the config's warnings now come with the policy's).
    let at_start = warning(&first, "first");
    assert_eq!(
        server.log().matches(&at_start).count(),
        1,
        "{}",
        server.log()
    );
    assert!(admin(&addr)["warnings"].to_string().contains(&at_start));
    // A reload that brings one: logged, and shown with the policy's warnings.
    let second = first.replace("state:", &format!("{}state:", plain("second")));
    std::fs::write(dir.join("gateway.yaml"), &second).unwrap();
    let (status, answer) = admin_reload(&addr);
    assert_eq!(status, 200, "{answer}");
    let at_reload = warning(&second, "second");
    let warnings = admin(&addr)["warnings"].to_string();
    assert!(warnings.contains(&at_reload), "{warnings}");
    assert!(
        warnings.contains("warning[route::"),
        "the policy's too: {warnings}"
    );
    wait_for(&server, "the warning in the log", || {
        server.log().contains(&at_reload)
    });
    // The one the last version had already is counted, not logged again.
    assert_eq!(
        server.log().matches(&at_start).count(),
        1,
        "{}",
        server.log()
    );
    assert!(
        server
            .log()
            .contains("warning(s) of the last version still hold"),
        "{}",
        server.log()
    );
    assert_eq!(chat_as(&addr, "sk-second").0, 200);
}
