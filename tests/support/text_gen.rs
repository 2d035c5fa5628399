//! Large, valid `.route` policies as text, for benchmarks of the front end
//! (check, the language server). `rules` counts constraints, classification
//! rules and routes together.
#![allow(dead_code, reason = "each bench uses part of it")]

/// A valid policy with about `rules` rules over `rules / 10` models (at least 20).
pub fn policy_with_rules(rules: usize) -> String {
    let models = (rules / 10).max(20);
    let constraints = rules / 2;
    let intents = (rules / 4).max(1);
    let mut s = String::from(
        "tenant {\n  plan: enum(free, pro, enterprise)\n  region: enum(us, eu)\n  data_residency: bool\n}\n\n\
         request {\n  feature: string\n}\n\n",
    );
    for p in 0..10 {
        s += &format!(
            "provider p{p} {{\n  region {}\n}}\n\n",
            if p % 2 == 0 { "us" } else { "eu" }
        );
    }
    for m in 0..models {
        s += &format!(
            "model m{m} {{\n  provider p{}\n  kind chat\n  context 128k\n  price in ${}.{:02} out ${}.{:02} per 1M\n  caps [tools, json]\n  quality 0.{}\n}}\n\n",
            m % 10,
            m % 3,
            m % 90 + 10,
            m % 5,
            m % 80 + 20,
            m % 9 + 1
        );
    }
    s += "constraints {\n";
    for c in 0..constraints {
        // Keep models m0..m2 allowed for everyone so every route stays covered.
        let m = 3 + c % (models - 3);
        let cond = match c % 3 {
            0 => "tenant.plan == free and tenant.region == eu".to_string(),
            1 => format!("request.feature == \"f{}\"", c % 50),
            _ => "tenant.data_residency and request.input_tokens > 100000".to_string(),
        };
        s += &format!("  deny model m{m} when {cond}\n");
    }
    s += "}\n\nclassify {\n";
    for i in 0..intents {
        s += &format!("  intent{i} when request.feature == \"i{i}\"\n");
    }
    s += "  chat otherwise\n}\n\n";
    for i in 0..intents {
        s += &format!(
            "route intent{i} {{\n  candidates [m0, m{}, m{}]\n  score 0.5 * price + 0.5 * latency\n  fallback [m1]\n}}\n\n",
            3 + i % (models - 3),
            3 + (i + 7) % (models - 3)
        );
    }
    s += "route chat {\n  candidates [m0, m1, m2]\n  fallback [m1]\n}\n";
    s
}
