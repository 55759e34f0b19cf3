//! `drover`: thin entry point; everything lives in the library.

use std::process::ExitCode;

use clap::Parser as _;
use drover_cli::{self as cli, Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let json_errors = wants_json(std::env::args());
    let cli = Cli::parse();
    // `drover rollout list | head -1`: a closed pipe ends the process quietly, as for
    // any Unix tool, instead of a panic in println!. Not for the commands that run a
    // server: a vectored write (writev has no MSG_NOSIGNAL) to a socket its peer reset
    // would raise SIGPIPE and kill the whole server without a word, as 10,000 simulated
    // devices on the rmqtt broker did; there SIGPIPE stays ignored and the write fails.
    if !matches!(cli.command, Command::Serve(_) | Command::Demo(_)) {
        sigpipe::reset();
    }
    // The demo narrates on stdout; `serve` logs what it does; an ordinary command prints
    // its answer and logs only warnings (RUST_LOG changes any of these).
    let default_filter = match cli.command {
        Command::Demo(_) => "error,rumqttd=off",
        // rumqttd logs every connection that ends (a device going away, the control
        // plane's own sessions at stop) as an ERROR from its router and links; the TLS
        // front in front of it logs and counts what Drover cares about, so those two
        // targets are off unless RUST_LOG asks (`RUST_LOG=info,rumqttd=debug`).
        Command::Serve(_) => {
            "info,rumqttd=warn,rumqttd::router::routing=off,rumqttd::server::broker=off"
        }
        _ => "warn,rumqttd=off",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == cli::LogFormat::Json {
        logs.json().with_ansi(false).init();
    } else {
        // No colour codes in files and journald: ANSI only when stderr is a terminal.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Demo(a) => cli::demo::run(a).await,
            Command::Serve(a) => cli::serve::run(a).await,
            Command::PrintDefaultConfig { output } => cli::print_default_config(output),
            Command::Keys(k) => cli::keys::run(k).await,
            Command::Broker(b) => cli::broker::run(b),
            Command::Doctor(d) => cli::doctor::run(d),
            Command::Model(m) => cli::model::run(m).await,
            Command::Device(d) => cli::device::run(d).await,
            Command::Rollout(r) => cli::rollout::run(r).await,
            Command::Drift(d) => cli::drift::run(d).await,
            Command::Train(t) => cli::train::run(t).await,
            Command::Token(t) => cli::token::run(t).await,
            Command::Integration(i) => cli::integration::run(i).await,
            Command::Audit(a) => cli::token::audit(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<cli::client::CliError>()
                .map(|c| c.exit_code())
                .unwrap_or(1);
            if json_errors {
                let message = e
                    .chain()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(": ");
                eprintln!("{}", serde_json::json!({ "error": message, "code": code }));
            } else {
                eprintln!("error: {e}");
                for cause in e.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
            }
            ExitCode::from(code)
        }
    }
}

/// `--output json` (or `--output=json`) anywhere on the command line: errors go out as
/// JSON too, so a script reading JSON never has to parse a sentence.
fn wants_json(args: impl Iterator<Item = String>) -> bool {
    let args: Vec<String> = args.collect();
    args.iter().any(|a| a == "--output=json")
        || args
            .windows(2)
            .any(|w| w[0] == "--output" && w[1] == "json")
}
