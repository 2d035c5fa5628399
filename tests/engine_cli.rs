//! Golden tests of `routeplane test` and `routeplane explain` on the example policies.
#![allow(clippy::unwrap_used, reason = "test helpers")]

use std::process::Command;

fn routeplane(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_routeplane"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn example_policy_decision_tests_pass() {
    let (code, out, err) = routeplane(&["test", "policies/"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("test saas::free_never_premium ... ok"),
        "{out}"
    );
    assert!(out.contains("test result: ok."), "{out}");
    for policy in ["startup", "saas", "enterprise"] {
        let n = out
            .lines()
            .filter(|l| l.starts_with(&format!("test {policy}::")))
            .count();
        assert!(n >= 10, "{policy} has {n} cases");
    }
}

#[test]
fn failing_cases_exit_1_and_render_as_junit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    std::fs::create_dir(&p).unwrap();
    let policy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/startup/policy.route"
    ))
    .unwrap();
    std::fs::write(p.join("policy.route"), policy).unwrap();
    std::fs::write(
        p.join("x.test.yaml"),
        "cases:\n  - name: wrong\n    tenant: { attrs: {} }\n    expect: { first: claude-haiku-4-5 }\n",
    )
    .unwrap();
    let path = p.to_str().unwrap();
    let (code, out, _) = routeplane(&["test", path]);
    assert_eq!(code, 1);
    assert!(out.contains("test p::wrong ... FAILED"), "{out}");
    assert!(
        out.contains("first: expected `claude-haiku-4-5`, got `gpt-4o-mini`"),
        "{out}"
    );
    assert!(
        out.contains("test result: FAILED. 0 passed; 1 failed"),
        "{out}"
    );
    let (code, out, _) = routeplane(&["test", path, "--format", "junit"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("<testcase classname=\"p\" name=\"p::wrong\""),
        "{out}"
    );
    let (_, out, _) = routeplane(&["test", path, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["summary"]["failed"], 1);
}

/// A case that sends a value the policy would refuse at the gateway, or an
/// attribute the policy does not declare, fails by name: it would otherwise
/// test a request no client can make.
#[test]
fn cases_with_undeclared_or_ill_typed_metadata_fail_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    std::fs::create_dir(&p).unwrap();
    for f in [
        "catalogue.route",
        "constraints.route",
        "protect.route",
        "routing.route",
    ] {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("policies/saas")
                .join(f),
        )
        .unwrap();
        std::fs::write(p.join(f), text).unwrap();
    }
    std::fs::write(
        p.join("x.test.yaml"),
        "cases:\n  - name: typo\n    tenant: { attrs: {} }\n    request: { meta: { priority: hihg } }\n    expect: { intent: chat }\n  - name: undeclared\n    tenant: { attrs: {} }\n    request: { meta: { priorty: low } }\n    expect: { intent: chat }\n",
    )
    .unwrap();
    let (code, out, _) = routeplane(&["test", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("`priority` is `hihg`, which the policy does not accept: send one of `low`, `normal`, `high`"),
        "{out}"
    );
    assert!(
        out.contains("request attribute `priorty` is not declared"),
        "{out}"
    );
    assert!(out.contains("0 passed; 2 failed"), "{out}");
}

#[test]
fn explain_names_the_rule_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    std::fs::write(
        &req,
        r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}"#,
    )
    .unwrap();
    let req = req.to_str().unwrap();
    let attrs = r#"{"plan": "enterprise", "region": "eu", "data_residency": true}"#;
    let (code, out, err) = routeplane(&[
        "explain",
        "--policy",
        "policies/saas",
        "--tenant",
        "acme-eu",
        "--tenant-attrs",
        attrs,
        "--request",
        req,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("`eu_residency` (policies/saas/constraints.route:"),
        "{out}"
    );
    assert!(
        out.contains(
            "outcome: denied (model-denied): model `gpt-4o-mini` is denied by rule `eu_residency`"
        ),
        "{out}"
    );
    let (code, out, err) = routeplane(&[
        "explain",
        "--config",
        "examples/gateway.yaml",
        "--policy",
        "policies/saas",
        "--tenant",
        "hobby",
        "--request",
        req,
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outcome"], "ok");
    assert_eq!(v["tenant"], "hobby");
    assert_eq!(v["attempts"][0], "gpt-4o-mini");
    assert_eq!(v["constraints"][1]["name"], "free_plan");
    let (code, _, err) = routeplane(&[
        "explain",
        "--policy",
        "policies/saas",
        "--tenant",
        "x",
        "--tenant-attrs",
        r#"{"plan": "gold"}"#,
        "--request",
        req,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("`gold`"), "{err}");
    // What the gateway answers with a 400 is not explained as if it were served.
    for (body, says) in [
        (
            r#"{"model": "auto", "metadata": {"priority": "LOW"}, "messages": [{"role": "user", "content": "hi"}]}"#,
            "`LOW`",
        ),
        (
            r#"{"model": "auto", "max_tokens": "10", "messages": [{"role": "user", "content": "hi"}]}"#,
            "`max_tokens` must be a whole number",
        ),
    ] {
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, body).unwrap();
        let (code, out, err) = routeplane(&[
            "explain",
            "--config",
            "examples/gateway.yaml",
            "--policy",
            "policies/saas",
            "--tenant",
            "hobby",
            "--request",
            bad.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{out}");
        assert!(
            err.contains("the gateway would refuse this request (400)"),
            "{err}"
        );
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn two_cases_of_one_name_fail() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    std::fs::create_dir(&p).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/startup");
    std::fs::copy(root.join("policy.route"), p.join("policy.route")).unwrap();
    let case = "  - name: chat\n    tenant: { attrs: {} }\n    expect: { intent: chat }\n";
    std::fs::write(p.join("a.test.yaml"), format!("cases:\n{case}")).unwrap();
    std::fs::write(p.join("b.test.yaml"), format!("cases:\n{case}")).unwrap();
    let (code, out, _) = routeplane(&["test", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("another case of this policy is named `chat`"),
        "{out}"
    );
    assert!(out.contains("1 passed; 1 failed"), "{out}");
}

/// A case can say several thresholds are reached: past a downgrade, a lower
/// `confirm premium` threshold still keeps premium models out.
#[test]
fn a_case_can_reach_several_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    std::fs::create_dir(&p).unwrap();
    std::fs::write(
        p.join("policy.route"),
        "provider openai { region us }
model big { provider openai kind chat price in $10 out $30 per 1M tier premium }
model small { provider openai kind chat price in $1 out $2 per 1M }
classify { chat otherwise }
route chat {
  candidates [big, small]
  downgrade [big, small]
}
protect {
  budget monthly per tenant $10 {
    confirm premium at 80%
    downgrade at 90%
  }
}
",
    )
    .unwrap();
    std::fs::write(
        p.join("t.test.yaml"),
        "cases:
  - name: downgrade_alone_keeps_premium
    tenant: { attrs: {} }
    budget: downgrade
    expect: { order: [big, small] }
  - name: both_thresholds_keep_premium_out
    tenant: { attrs: {} }
    budget: [confirm_premium, downgrade]
    expect: { order: [small] }
  - name: confirmed_past_both
    tenant: { attrs: {} }
    budget: [confirm_premium, downgrade]
    request: { confirmed: true }
    expect: { order: [big, small] }
",
    )
    .unwrap();
    let (code, out, err) = routeplane(&["test", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 passed; 0 failed"), "{out}");
}

#[test]
fn a_missing_config_is_an_io_error() {
    // `--request` or `--policy` missing exited 2, a missing `--config` 1.
    for args in [
        &[
            "explain",
            "--config",
            "does-not-exist.yaml",
            "--tenant",
            "t",
            "--request",
            "examples/request.json",
        ][..],
        &["usage", "--config", "does-not-exist.yaml"],
    ] {
        let (code, _, err) = routeplane(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("cannot read `does-not-exist.yaml`"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_body_the_gateway_refuses_fails_the_case() {
    // `explain` refused these bodies (the gateway answers 400), but a decision
    // test routed them and passed.
    let (_dir, p) = startup_policy_with_tests(
        r#"cases:
      - name: numeric_metadata
        tenant: { attrs: {} }
        request: { body: { messages: [{ role: user, content: "hi" }], metadata: { feature: email-draft, n: 3 } } }
        expect: { intent: drafting }
      - name: not_an_object
        tenant: { attrs: {} }
        request: { body: "hello" }
        expect: { intent: chat }
      - name: valid
        tenant: { attrs: {} }
        request: { body: { messages: [{ role: user, content: "hi" }], metadata: { feature: email-draft } } }
        expect: { intent: drafting }
    "#,
    );
    let (code, out, _) = routeplane(&["test", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("test p::valid ... ok"), "{out}");
    assert!(
        out.contains("the gateway would refuse this request (400): `metadata.n` must be a string"),
        "{out}"
    );
    assert!(
        out.contains("the gateway would refuse this request (400): the body must be a JSON object"),
        "{out}"
    );
}

#[test]
fn a_case_that_expects_nothing_fails() {
    let (_dir, p) = startup_policy_with_tests(
        "cases:\n  - name: empty\n    tenant: { attrs: {} }\n    expect: {}\n",
    );
    let (code, out, _) = routeplane(&["test", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("`expect` checks nothing"), "{out}");
}

#[test]
fn stats_out_of_range_or_misspelt_are_refused() {
    // They were taken as given (a success rate of 7, a negative latency) or
    // ignored (a misspelt key), and the explanation scored with them.
    let dir = tempfile::tempdir().unwrap();
    let explain = |stats: &str| {
        let path = dir.path().join("stats.json");
        std::fs::write(&path, stats).unwrap();
        routeplane(&[
            "explain",
            "--policy",
            "policies/saas",
            "--tenant",
            "t",
            "--request",
            "examples/request.json",
            "--stats",
            path.to_str().unwrap(),
        ])
    };
    let (code, _, err) = explain(r#"{"models": {"gpt-4o-mini": {"success_rate": 7}}}"#);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("`success_rate` must be between 0 and 1"),
        "{err}"
    );
    let (code, _, err) = explain(r#"{"models": {"gpt-4o-mini": {"latency_ms": -5}}}"#);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("`latency_ms` must be a number of milliseconds"),
        "{err}"
    );
    let (code, _, err) = explain(r#"{"models": {"gpt-4o-mini": {"latency": 5}}}"#);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `latency`"), "{err}");
    let (code, _, err) =
        explain(r#"{"models": {"gpt-4o-mini": {"success_rate": 0.5, "latency_ms": 0}}}"#);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    // `routeplane explain ... | head -1` panicked ("failed printing to
    // stdout: Broken pipe") with a backtrace and exit code 101.
    for args in [
        &[
            "explain",
            "--config",
            "examples/gateway.yaml",
            "--tenant",
            "hobby",
            "--request",
            "examples/request.json",
        ][..],
        &["test", "policies"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_routeplane"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    }
}

#[test]
fn a_test_file_without_cases_is_not_reported_missing() {
    let (_dir, p) = startup_policy_with_tests("cases: []\n");
    let (code, _, err) = routeplane(&["test", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    // It said "no `*.test.yaml` files found", with one right there.
    assert!(!err.contains("files found"), "{err}");
    assert!(err.contains("no test cases found"), "{err}");
}

/// The startup example policy in a directory of its own, with `tests` as its
/// `t.test.yaml`.
fn startup_policy_with_tests(tests: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p");
    std::fs::create_dir(&p).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/policies/startup/policy.route"),
        p.join("policy.route"),
    )
    .unwrap();
    std::fs::write(p.join("t.test.yaml"), tests).unwrap();
    (dir, p)
}
