//! `ews-relay`: parse the command line, set up logging, run the relay until SIGTERM/SIGINT.
//!
//! Exit codes: 0 after a clean shutdown, 64 when a flag's value is wrong (the message names the
//! flag), 1 for other start-up failures (e.g. the port is taken).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use ews_relay::config::{Args, Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// BSD sysexits EX_USAGE: the command was used incorrectly.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ews-relay: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let _log_guard = init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ews-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = ews_relay::Listeners::bind(&config).await?;
        ews_relay::run(listeners, config, termination()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("ews-relay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go through a background writer so a slow stdout (a full pipe to the container runtime)
/// never blocks request handling; the guard flushes it on exit.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    // rustls warns on every handshake that sends an IP address as SNI (scanners connecting by
    // address): at info that would let anyone flood the log, so rustls logs errors only.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// Completes on SIGTERM (container stop) or SIGINT (Ctrl-C).
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the relay");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
