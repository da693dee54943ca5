//! Logging set-up shared by the binaries: `env_logger` on stderr, `RUST_LOG`
//! respected, `-v`/`-q` mapped to levels when `RUST_LOG` is unset.

use clap::Args;

/// `-v` (repeatable) and `-q` flags.
#[derive(Debug, Clone, Args)]
pub struct Verbosity {
    /// More log output on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

impl Verbosity {
    /// The level filter these flags ask for.
    pub fn level(&self) -> log::LevelFilter {
        if self.quiet {
            return log::LevelFilter::Error;
        }
        match self.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            2 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }
}

/// Install the logger once.
pub fn init(v: &Verbosity) {
    let mut b = env_logger::Builder::new();
    b.filter_level(v.level());
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format_timestamp_millis()
        .target(env_logger::Target::Stderr);
    let _ = b.try_init();
}
