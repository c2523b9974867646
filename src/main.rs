//! `caliopen-imap`: one executable, three programs. The mode comes from the
//! file name it was started as (`imapworker`, `imapctl`, `idpoller`
//! symlinks), else from the first argument (`worker`, `ctl`, `poller`).
//! Everything else is library code.

use std::process::ExitCode;

use caliopen_imap::{app, cli::Mode};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let argv0 = if args.is_empty() {
        String::from("caliopen-imap")
    } else {
        args.remove(0)
    };
    let base = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    // Each mode sees its own name as program name, as in uutils.
    if let Some(mode) = Mode::from_program(&base) {
        return app::run(mode, mode.program(), &args);
    }
    match args.first().map(String::as_str) {
        Some(first) => match Mode::from_subcommand(first) {
            Some(mode) => app::run(mode, &format!("caliopen-imap {first}"), &args[1..]),
            None => app::top_level(first),
        },
        None => app::top_level(""),
    }
}
