//! `routeplane test [PATH...]`: run the decision tests (`*.test.yaml`) next to
//! each policy. Output like `cargo test`; `--format json|junit` for machines.
//!
//! Exit codes: 0 every case passed, 1 a case failed (or none were found),
//! 2 usage or I/O error.

use std::path::PathBuf;

use routeplane::policytest;

#[derive(clap::Args)]
pub struct Args {
    /// Policy directories; each directory of `.route` files is one policy
    #[arg(default_value = "policies/")]
    paths: Vec<PathBuf>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
    Junit,
}

pub fn run(args: Args) -> u8 {
    let results = match policytest::run_paths(&args.paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("routeplane: {e}");
            return 2;
        }
    };
    let out = match args.format {
        Format::Human => policytest::render_human(&results),
        Format::Json => policytest::render_json(&results),
        Format::Junit => policytest::render_junit(&results),
    };
    if !super::print_out(&out) {
        return 2;
    }
    if results.is_empty() {
        // Also reached with test files whose `cases:` are empty: saying no
        // file was found sent people looking for a file that is there.
        eprintln!(
            "routeplane: no test cases found: put `*.test.yaml` files with `cases:` next to the policies"
        );
        return 1;
    }
    u8::from(results.iter().any(|r| !r.passed()))
}
