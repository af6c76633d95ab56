//! The tracing subscriber of obd's binaries (`obd`, `obd-snapshotter` and its
//! device workers): events to stderr at `level` or above, `RUST_LOG` overriding
//! it, colour only on a terminal.

use std::io::IsTerminal;

use crate::config::LogFormat;

/// Installs the global subscriber. `level` is an `EnvFilter` directive
/// (`info`, `warn,obd_device=debug`, ...), used when `RUST_LOG` is unset.
/// Fails on a bad directive or if a subscriber is already installed.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .map_err(|e| format!("log level {level:?}: {e}"))?;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in the journal or in files.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => fmt.try_init(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    }
    .map_err(|e| format!("installing the log subscriber: {e}"))
}
