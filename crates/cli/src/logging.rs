//! Logging set-up shared by the binaries: `env_logger` on stderr, `RUST_LOG`
//! respected, `-v`/`-q` mapped to levels when `RUST_LOG` is unset.

use clap::Args;

/// `-v` (repeatable) and `-q` flags.
#[derive(Debug, Clone, Args)]
pub struct Verbosity {
    /// More log output on stderr (each -v one level more: warn, info, debug, trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

impl Verbosity {
    /// The level filter these flags ask for.
    pub fn level(&self, base: log::LevelFilter) -> log::LevelFilter {
        if self.quiet {
            return log::LevelFilter::Error;
        }
        const UP: [log::LevelFilter; 5] = [
            log::LevelFilter::Error,
            log::LevelFilter::Warn,
            log::LevelFilter::Info,
            log::LevelFilter::Debug,
            log::LevelFilter::Trace,
        ];
        let at = UP.iter().position(|l| *l == base).unwrap_or(1);
        UP[(at + usize::from(self.verbose)).min(UP.len() - 1)]
    }
}

/// Install the logger once. Commands log at `warn` by default, the
/// long-running servers at `info`; each `-v` goes one level further.
pub fn init(v: &Verbosity, base: log::LevelFilter) {
    let mut b = env_logger::Builder::new();
    b.filter_level(v.level(base));
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format_timestamp_millis()
        .target(env_logger::Target::Stderr);
    let _ = b.try_init();
}
