//! Raw command-line flags of every mode, and nothing else.
//!
//! The structs here are what argh parses; turning them into validated values
//! (UUIDs, host:port, passwords from env/file/prompt) is the job of the code
//! that runs each command. Kept apart so the flags can be read in one place,
//! as ripgrep keeps its "low" arguments apart from the resolved ones.

use std::path::PathBuf;

use argh::FromArgs;

/// The three programs the binary can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Worker,
    Ctl,
    Poller,
}

impl Mode {
    /// The name the mode has as a symlink (and as its config file in /etc/caliopen).
    pub fn program(self) -> &'static str {
        match self {
            Mode::Worker => "imapworker",
            Mode::Ctl => "imapctl",
            Mode::Poller => "idpoller",
        }
    }

    /// The mode named by a program file name (`imapctl`) or a first argument (`ctl`).
    pub fn from_program(name: &str) -> Option<Mode> {
        match name {
            "imapworker" => Some(Mode::Worker),
            "imapctl" => Some(Mode::Ctl),
            "idpoller" => Some(Mode::Poller),
            _ => None,
        }
    }

    pub fn from_subcommand(name: &str) -> Option<Mode> {
        match name {
            "worker" => Some(Mode::Worker),
            "ctl" => Some(Mode::Ctl),
            "poller" => Some(Mode::Poller),
            _ => None,
        }
    }
}

/// Top-level usage, printed for `caliopen-imap --help` and unknown modes.
pub const TOP_USAGE: &str = "\
Usage: caliopen-imap <mode> [<args>]
       imapworker | imapctl | idpoller [<args>]   (symlinks to caliopen-imap)

Caliopen's IMAP importer: fetch users' remote mail into Cassandra.

Modes:
  worker    the imapworker daemon: takes sync/fullfetch orders over NATS
  ctl       imapctl: addremote, syncremote, fullfetch, listremotes, removeremote
  poller    the idpoller daemon: schedules periodic syncs of remote identities

Options:
  --help, help      display usage information
  --version         print the version

Run `caliopen-imap <mode> --help` for the commands of a mode.";

// ------------------------------------------------------------------ worker

/// imapworker: fetch mail from remote IMAP accounts on orders received over NATS.
#[derive(FromArgs, Debug)]
pub struct WorkerArgs {
    /// configuration file (YAML, Caliopen's imapworker.yaml keys)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,
    #[argh(subcommand)]
    pub cmd: WorkerCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum WorkerCmd {
    Start(StartArgs),
    Config(ShowConfigArgs),
}

/// run the daemon until SIGTERM or SIGINT
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "start")]
pub struct StartArgs {}

/// print the effective configuration (secrets redacted) and exit
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config")]
pub struct ShowConfigArgs {}

// ------------------------------------------------------------------ poller

/// idpoller: schedule a periodic sync job for every active remote identity.
#[derive(FromArgs, Debug)]
pub struct PollerArgs {
    /// configuration file (YAML, Caliopen's idpoller.yaml keys)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,
    #[argh(subcommand)]
    pub cmd: PollerCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum PollerCmd {
    Start(StartArgs),
    Config(ShowConfigArgs),
}

// ------------------------------------------------------------------ ctl

/// imapctl: on-demand IMAP operations and remote identity management.
#[derive(FromArgs, Debug)]
pub struct CtlArgs {
    /// configuration file (the same file as imapworker's)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,
    #[argh(subcommand)]
    pub cmd: CtlCmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum CtlCmd {
    AddRemote(AddRemoteArgs),
    SyncRemote(SyncRemoteArgs),
    FullFetch(FullFetchArgs),
    ListRemotes(ListRemotesArgs),
    RemoveRemote(RemoveRemoteArgs),
    Config(ShowConfigArgs),
}

/// create a remote identity in Cassandra and schedule it on the poller
#[derive(FromArgs)]
#[argh(subcommand, name = "addremote")]
pub struct AddRemoteArgs {
    /// remote IMAP login (also the identity's identifier)
    #[argh(option)]
    pub login: String,
    /// IMAP password (visible in `ps`: prefer --pass-env, --pass-file or the prompt)
    #[argh(option)]
    pub pass: Option<String>,
    /// read the password from this environment variable
    #[argh(option)]
    pub pass_env: Option<String>,
    /// read the password from the first line of this file
    #[argh(option)]
    pub pass_file: Option<PathBuf>,
    /// do not store a password: syncremote must then be given one
    #[argh(switch)]
    pub no_pass: bool,
    /// remote IMAP server, host:port (993: implicit TLS, 143: STARTTLS)
    #[argh(option)]
    pub server: String,
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option)]
    pub username: Option<String>,
    /// display name of the identity (default: the login)
    #[argh(option)]
    pub display: Option<String>,
    /// mailbox(es) to sync, comma-separated (default INBOX)
    #[argh(option)]
    pub mailbox: Option<String>,
    /// minutes between two scheduled syncs, or a cron expression (default 15)
    #[argh(option)]
    pub pollinterval: Option<String>,
}

/// order a sync of a stored remote identity (needs a running imapworker)
#[derive(FromArgs)]
#[argh(subcommand, name = "syncremote")]
pub struct SyncRemoteArgs {
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option)]
    pub username: Option<String>,
    /// the identity's identifier (its login)
    #[argh(option)]
    pub identifier: Option<String>,
    /// the identity's id (UUID), instead of --identifier
    #[argh(option)]
    pub remoteid: Option<String>,
    /// IMAP password for this run (when none is stored)
    #[argh(option)]
    pub pass: Option<String>,
    /// read the password from this environment variable
    #[argh(option)]
    pub pass_env: Option<String>,
    /// read the password from the first line of this file
    #[argh(option)]
    pub pass_file: Option<PathBuf>,
    /// wait for the worker's result and exit non-zero if the sync failed
    #[argh(switch)]
    pub wait: bool,
    /// with --wait, give up after this many seconds (default 3600)
    #[argh(option, default = "3600")]
    pub timeout: u64,
}

/// fetch every message of a mailbox into a user account, keeping no sync state
#[derive(FromArgs)]
#[argh(subcommand, name = "fullfetch")]
pub struct FullFetchArgs {
    /// remote IMAP login
    #[argh(option)]
    pub login: String,
    /// IMAP password (visible in `ps`: prefer --pass-env, --pass-file or the prompt)
    #[argh(option)]
    pub pass: Option<String>,
    /// read the password from this environment variable
    #[argh(option)]
    pub pass_env: Option<String>,
    /// read the password from the first line of this file
    #[argh(option)]
    pub pass_file: Option<PathBuf>,
    /// remote IMAP server, host:port
    #[argh(option)]
    pub server: String,
    /// mailbox to fetch (default INBOX)
    #[argh(option, default = "String::from(\"INBOX\")")]
    pub mailbox: String,
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option)]
    pub username: Option<String>,
    /// wait for the worker's result and exit non-zero if the fetch failed
    #[argh(switch)]
    pub wait: bool,
    /// with --wait, give up after this many seconds (default 3600)
    #[argh(option, default = "3600")]
    pub timeout: u64,
}

/// list a user's remote identities with their sync state
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "listremotes")]
pub struct ListRemotesArgs {
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option)]
    pub username: Option<String>,
    /// print JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// delete a remote identity and unschedule it
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "removeremote")]
pub struct RemoveRemoteArgs {
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option)]
    pub username: Option<String>,
    /// the identity's identifier (its login)
    #[argh(option)]
    pub identifier: Option<String>,
    /// the identity's id (UUID), instead of --identifier
    #[argh(option)]
    pub remoteid: Option<String>,
}

// ------------------------------------------------------------------ parsing

/// What parsing the command line gave.
pub enum Parsed<T> {
    Args(T),
    /// Help or an error was printed; exit with this code.
    Exit(u8),
}

/// Parse `args` (without the program name) for the command called `name`.
/// Help goes to stdout with code 0; a usage error to stderr with code 2.
pub fn parse<T: FromArgs>(name: &str, args: &[String]) -> Parsed<T> {
    let args = split_equals(args);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    match T::from_args(&[name], &refs) {
        Ok(t) => Parsed::Args(t),
        Err(early) => match early.status {
            Ok(()) => {
                println!("{}", early.output);
                Parsed::Exit(0)
            }
            Err(()) => {
                // One line, whatever argh's layout ("Required options not
                // provided:\n    --server" becomes one sentence).
                let text = early
                    .output
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                eprintln!("{name}: {text} (see {name} --help)");
                Parsed::Exit(crate::error::code::USAGE)
            }
        },
    }
}

/// Accept `--flag=value` as the Go binaries (cobra) did; argh wants two words.
fn split_equals(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut rest_literal = false;
    for a in args {
        if rest_literal {
            out.push(a.clone());
            continue;
        }
        if a == "--" {
            rest_literal = true;
            out.push(a.clone());
            continue;
        }
        match a.strip_prefix("--").and_then(|f| f.split_once('=')) {
            Some((flag, value)) if !flag.is_empty() => {
                out.push(format!("--{flag}"));
                out.push(value.to_string());
            }
            _ => out.push(a.clone()),
        }
    }
    out
}

// The commands that take a password show it in `Debug` only as hidden.
macro_rules! debug_hiding_pass {
    ($t:ty, $($field:ident),*) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    $(.field(stringify!($field), &self.$field))*
                    .field("pass", &self.pass.as_deref().map(crate::bus::wire::hidden))
                    .finish_non_exhaustive()
            }
        }
    };
}
debug_hiding_pass!(
    AddRemoteArgs,
    login,
    pass_env,
    pass_file,
    server,
    userid,
    username
);
debug_hiding_pass!(
    SyncRemoteArgs,
    userid,
    username,
    identifier,
    remoteid,
    pass_env,
    wait
);
debug_hiding_pass!(
    FullFetchArgs,
    login,
    pass_env,
    pass_file,
    server,
    mailbox,
    userid,
    wait
);

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn debug_hides_passwords() {
        let Parsed::Args(a) = parse::<CtlArgs>(
            "imapctl",
            &s(&[
                "syncremote",
                "--userid",
                "u",
                "--identifier",
                "i",
                "--pass",
                "pw-XYZ",
            ]),
        ) else {
            panic!("parsed")
        };
        let d = format!("{a:?}");
        assert!(!d.contains("pw-XYZ") && d.contains("<hidden>"), "{d}");
    }

    #[test]
    fn equals_flags_are_split() {
        assert_eq!(
            split_equals(&s(&["syncremote", "--userid=abc", "--wait", "--", "--x=y"])),
            s(&["syncremote", "--userid", "abc", "--wait", "--", "--x=y"])
        );
    }

    #[test]
    fn ctl_parses_seed_example() {
        let args = s(&[
            "addremote",
            "--login",
            "a@b.c",
            "--pass",
            "pw",
            "--server",
            "imap.b.c:993",
            "--userid",
            "0e2b6a1c-5b8a-4e8f-9a43-5c0a3f3b9c11",
        ]);
        let Parsed::Args(CtlArgs {
            cmd: CtlCmd::AddRemote(a),
            ..
        }) = parse::<CtlArgs>("imapctl", &args)
        else {
            panic!("did not parse")
        };
        assert_eq!(a.login, "a@b.c");
        assert_eq!(a.server, "imap.b.c:993");
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::from_program("imapctl"), Some(Mode::Ctl));
        assert_eq!(Mode::from_subcommand("poller"), Some(Mode::Poller));
        assert_eq!(Mode::from_subcommand("imapctl"), None);
    }
}
