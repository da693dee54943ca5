//! What the binaries share besides exit codes and logging: parsers for
//! seconds flags, and the SIGINT/SIGTERM wiring of the two daemons.

use autopoll_protocol::Shutdown;

use crate::exit::{self, CliError};

/// Seconds in [0, 86400].
pub fn secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in [0, 86400]")),
    }
}

/// Seconds in (0, 86400].
pub fn positive_secs(s: &str) -> Result<f64, String> {
    match secs(s) {
        Ok(v) if v > 0.0 => Ok(v),
        Ok(_) => Err("must be more than 0".into()),
        Err(e) => Err(e),
    }
}

/// A stop button pressed by SIGINT and SIGTERM (ctrlc's handler thread).
pub fn shutdown_on_signals() -> Result<Shutdown, CliError> {
    let shutdown = Shutdown::new()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot create a pipe: {e}")))?;
    let sd = shutdown.clone();
    ctrlc::set_handler(move || sd.trigger()).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot install signal handlers: {e}"),
        )
    })?;
    Ok(shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(secs("0"), Ok(0.0));
        assert_eq!(secs("1.5"), Ok(1.5));
        assert!(
            secs("-1").is_err()
                && secs("86401").is_err()
                && secs("x").is_err()
                && secs("NaN").is_err()
        );
        assert!(positive_secs("0").is_err());
        assert_eq!(positive_secs("0.25"), Ok(0.25));
    }
}
