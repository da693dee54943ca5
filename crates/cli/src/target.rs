//! Which server a command talks to: `--name` and `--runtime-dir`, shared by
//! `autopoll ask`, `autopoll status`, `autopoll-server` and the poller.

use std::path::PathBuf;

use autopoll_protocol::{ServerPaths, runtime_dir};
use clap::Args;

use crate::exit::{self, CliError};

/// `--name` and `--runtime-dir`.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Server name: its directory under the runtime dir.
    #[arg(
        long,
        env = "AUTOPOLL_NAME",
        default_value = "default",
        value_name = "NAME"
    )]
    pub name: String,
    /// Runtime directory [default: $XDG_RUNTIME_DIR/autopoll, else /tmp/autopoll-$UID].
    #[arg(long, env = "AUTOPOLL_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

impl Target {
    /// The runtime directory in effect.
    pub fn runtime(&self) -> PathBuf {
        runtime_dir(self.runtime_dir.as_deref())
    }

    /// The server's paths.
    pub fn paths(&self) -> Result<ServerPaths, CliError> {
        ServerPaths::new(&self.runtime(), &self.name).map_err(|e| CliError::new(exit::USAGE, e))
    }
}
