//! `routeplane fmt` (being built; see the issue tracker).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> u8 {
    eprintln!("routeplane: `fmt` is not built yet");
    2
}
