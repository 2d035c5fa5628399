//! `routeplane check [PATH...]`: analyze policies and report every diagnostic.
//!
//! Exit codes: 0 clean (warnings allowed), 1 errors (or warnings with
//! `--deny-warnings`), 2 usage or I/O errors.

use std::io::Write as _;
use std::path::PathBuf;

use routeplane::analysis::analyze;
use routeplane::load::{self, PolicyDir};
use routeplane::render::{self, Checked, ColorChoice, Human, Summary};

#[derive(clap::Args)]
pub struct Args {
    /// Policy directories or `.route` files; each directory of `.route` files is one policy
    #[arg(default_value = "policies/")]
    paths: Vec<PathBuf>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Fail (exit 1) on warnings too
    #[arg(long)]
    deny_warnings: bool,
    /// Color human output: `auto` colors only a terminal, and honours `NO_COLOR`
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Reports with source lines and labels, for people
    Human,
    /// One JSON document with every diagnostic and a summary
    Json,
    /// GitHub Actions workflow commands (annotations)
    Github,
    /// SARIF 2.1.0, for code scanning
    Sarif,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

pub fn run(args: Args) -> u8 {
    let color = match args.color {
        Color::Auto => ColorChoice::Auto,
        Color::Always => ColorChoice::Always,
        Color::Never => ColorChoice::Never,
    }
    .enabled();
    let human = Human::new(color);

    let policies: Vec<PolicyDir> = match load::discover(&args.paths) {
        Ok(p) => p,
        Err(e) => {
            // I/O errors go to stderr whatever the format: stdout stays a
            // valid document (or empty) for the tools that parse it.
            let human = Human::new(color && std::io::IsTerminal::is_terminal(&std::io::stderr()));
            eprint!("{}", human.other(&e));
            return 2;
        }
    };

    let analyses: Vec<_> = policies.iter().map(|p| analyze(&p.sources)).collect();
    let names: Vec<String> = policies
        .iter()
        .map(|p| p.root.display().to_string())
        .collect();
    let checked: Vec<Checked<'_>> = policies
        .iter()
        .zip(&analyses)
        .zip(&names)
        .map(|((p, a), name)| Checked {
            name,
            sources: &p.sources,
            diagnostics: &a.diagnostics,
        })
        .collect();

    let out = match args.format {
        Format::Human => human.run(&checked, args.deny_warnings),
        Format::Json => render::json(&checked, args.deny_warnings),
        Format::Github => render::github(&checked),
        Format::Sarif => render::sarif(&checked),
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        // A closed pipe (`check | head`) is not worth a panic; say nothing more.
        return 2;
    }
    if Summary::of(&checked).failed(args.deny_warnings) {
        1
    } else {
        0
    }
}
