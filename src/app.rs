//! Glue between the command line and the modes: logging, `--version`, flag
//! parsing, configuration, the runtime, and the one mapping of errors to
//! exit codes. Every mode runs through [`run`], and every mode's entry point
//! has the same shape: `run(args, settings, shutdown) -> Result<ExitCode>`.

use std::path::Path;
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cli::{self, Mode, Parsed};
use crate::config::{self, PollerSettings, WorkerSettings};
use crate::error::{self, code, Failure};
use crate::pidfile::PidFile;
use crate::shutdown::{self, Shutdown};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `caliopen-imap` with no valid mode: help, version, or a usage error.
pub fn top_level(first: &str) -> ExitCode {
    match first {
        "--help" | "-h" | "help" => {
            println!("{}", cli::TOP_USAGE);
            ExitCode::SUCCESS
        }
        "--version" | "-V" => {
            println!("caliopen-imap {VERSION}");
            ExitCode::SUCCESS
        }
        "" => {
            eprintln!("{}", cli::TOP_USAGE);
            ExitCode::from(code::USAGE)
        }
        other => {
            eprintln!("caliopen-imap: unknown mode {other:?}: expected worker, ctl or poller");
            eprintln!("{}", cli::TOP_USAGE);
            ExitCode::from(code::USAGE)
        }
    }
}

/// The log filter without `CALIOPEN_IMAP_LOG`: daemons `info`, the CLI
/// `warn` so its own output stays readable; `-v` (the Go binaries'
/// `--verbose`) makes it `debug`.
fn default_log_filter(mode: Mode, verbose: bool) -> &'static str {
    match mode {
        _ if verbose => "debug",
        Mode::Ctl => "warn",
        _ => "info",
    }
}

/// Run `mode` with `args` (the words after the mode); `prog` is how the user
/// called it, for help texts and error messages.
pub fn run(mode: Mode, prog: &str, args: &[String]) -> ExitCode {
    // The Go binaries' persistent flags may come after the command.
    let hoisted = cli::hoist_globals(args);
    if hoisted.version {
        println!("{} (caliopen-imap {VERSION})", mode.program());
        return ExitCode::SUCCESS;
    }
    crate::logging::init(default_log_filter(mode, hoisted.verbose));
    crate::imap::tls::install_provider();
    let args = &hoisted.args;
    let result = match mode {
        Mode::Worker => match cli::parse::<cli::WorkerArgs>(prog, args) {
            Parsed::Helped => return ExitCode::SUCCESS,
            Parsed::Misused => return ExitCode::from(code::USAGE),
            Parsed::Args(a) => worker(a, mode),
        },
        Mode::Poller => match cli::parse::<cli::PollerArgs>(prog, args) {
            Parsed::Helped => return ExitCode::SUCCESS,
            Parsed::Misused => return ExitCode::from(code::USAGE),
            Parsed::Args(a) => poller(a, mode),
        },
        Mode::Ctl => match cli::parse::<cli::CtlArgs>(prog, args) {
            Parsed::Helped => return ExitCode::SUCCESS,
            Parsed::Misused => return ExitCode::from(code::USAGE),
            Parsed::Args(a) => ctl(a, mode),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => error::exit(mode.program(), &e),
    }
}

fn worker(mut a: cli::WorkerArgs, mode: Mode) -> anyhow::Result<ExitCode> {
    let show = matches!(a.cmd, cli::WorkerCmd::Config(_));
    let pid_file = match &a.cmd {
        cli::WorkerCmd::Start(st) => st.pid_file.clone(),
        _ => None,
    };
    locate(&mut a.config, a.configpath.as_deref(), mode.config_name())?;
    let config = a.config.clone();
    with_settings::<WorkerSettings, _, _>(
        config.as_deref(),
        mode,
        show,
        pid_file.as_deref(),
        WorkerSettings::validate,
        |s, sd| crate::worker::run(a, s, sd),
    )
}

fn poller(mut a: cli::PollerArgs, mode: Mode) -> anyhow::Result<ExitCode> {
    let show = matches!(a.cmd, cli::PollerCmd::Config(_));
    let pid_file = match &a.cmd {
        cli::PollerCmd::Start(st) => st.pid_file.clone(),
        _ => None,
    };
    // The poller re-reads `a.config` on SIGHUP: it gets the resolved file.
    locate(&mut a.config, a.configpath.as_deref(), mode.config_name())?;
    let config = a.config.clone();
    with_settings::<PollerSettings, _, _>(
        config.as_deref(),
        mode,
        show,
        pid_file.as_deref(),
        PollerSettings::validate,
        |s, sd| crate::poller::run(a, s, sd),
    )
}

fn ctl(mut a: cli::CtlArgs, mode: Mode) -> anyhow::Result<ExitCode> {
    let show = matches!(a.cmd, cli::CtlCmd::Config(_));
    locate(&mut a.config, a.configpath.as_deref(), mode.config_name())?;
    let config = a.config.clone();
    with_settings::<WorkerSettings, _, _>(
        config.as_deref(),
        mode,
        show,
        None,
        WorkerSettings::validate,
        |s, sd| crate::ctl::run(a, s, sd),
    )
}

/// Turn `-c NAME` / `--configpath DIR` into the file to load, in place.
fn locate(
    config: &mut Option<std::path::PathBuf>,
    configpath: Option<&Path>,
    go_name: &str,
) -> anyhow::Result<()> {
    *config = config::locate(config.as_deref(), configpath, go_name)?;
    Ok(())
}

/// Load and check the settings, then either print them (`config`) or run
/// the mode on a fresh runtime.
fn with_settings<S, F, Fut>(
    explicit: Option<&Path>,
    mode: Mode,
    show: bool,
    pid_file: Option<&Path>,
    validate: fn(&S) -> Result<(), Vec<String>>,
    body: F,
) -> anyhow::Result<ExitCode>
where
    S: Default + Serialize + DeserializeOwned + crate::logging::LogSettings,
    F: FnOnce(S, Shutdown) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    // /etc/caliopen/imapworker.yaml for imapctl too, as in Caliopen's images.
    let path = config::config_path(explicit, mode.config_name());
    let settings: S = config::load(path.as_deref())?;
    // From here on, in the format the settings ask for.
    crate::logging::apply(settings.log_format());
    if let Some(p) = &path {
        tracing::debug!(file = %p.display(), "configuration loaded");
    }
    validate(&settings).map_err(|errs| config::invalid(path.as_deref(), errs))?;
    if show {
        println!("{}", config::redacted_json(&settings));
        return Ok(ExitCode::SUCCESS);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Failed(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let shutdown = match mode {
            Mode::Ctl => Shutdown::never(),
            _ => shutdown::on_signals(),
        };
        // Written once SIGTERM is handled; held until the daemon's shutdown
        // path has run, then removed.
        let _pid = pid_file.map(PidFile::create).transpose()?;
        let stop = shutdown.clone();
        match body(settings, shutdown).await {
            // Asked to stop while still waiting for NATS or Cassandra at
            // start-up: a clean stop like any other, not a failed start.
            Err(e) if stop.is_triggered() && error::exit_code(&e) == error::code::UNAVAILABLE => {
                tracing::info!(reason = %format!("{e:#}"), "stopped before start-up finished");
                Ok(ExitCode::SUCCESS)
            }
            ended => ended,
        }
    })
}
