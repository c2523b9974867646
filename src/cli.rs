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

    /// The Go binaries' default config name: imapctl read imapworker's file.
    pub fn config_name(self) -> &'static str {
        match self {
            Mode::Worker | Mode::Ctl => "imapworker",
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
  ctl       imapctl: addremote, syncremote, fullfetch, listremotes, removeremote, unlock, status, retry
  poller    the idpoller daemon: schedules periodic syncs of remote identities

Options:
  --help, help      display usage information
  --version         print the version

Run `caliopen-imap <mode> --help` for the commands of a mode.";

// ------------------------------------------------------------------ worker

/// imapworker: fetch mail from remote IMAP accounts on orders received over NATS.
#[derive(FromArgs, Debug)]
pub struct WorkerArgs {
    /// configuration: a file, or a name looked up as NAME.yaml in --configpath,
    /// $CALIOPENROOT/src/backend/configs and . (as the Go binaries did)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,
    /// directory searched first for the -c NAME configuration
    #[argh(option)]
    pub configpath: Option<PathBuf>,
    /// log at debug level (unless CALIOPEN_IMAP_LOG says otherwise)
    #[argh(switch, short = 'v')]
    pub verbose: bool,
    /// print the version and exit
    #[argh(switch, short = 'V')]
    pub version: bool,
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
pub struct StartArgs {
    /// write the process id to this file (removed on exit); refuse to start
    /// while it names a live process
    #[argh(option, short = 'p')]
    pub pid_file: Option<PathBuf>,
}

/// print the effective configuration (secrets redacted) and exit
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config")]
pub struct ShowConfigArgs {}

// ------------------------------------------------------------------ poller

/// idpoller: schedule a periodic sync job for every active remote identity.
#[derive(FromArgs, Debug)]
pub struct PollerArgs {
    /// configuration: a file, or a name looked up as NAME.yaml in --configpath,
    /// $CALIOPENROOT/src/backend/configs and . (as the Go binaries did)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,
    /// directory searched first for the -c NAME configuration
    #[argh(option)]
    pub configpath: Option<PathBuf>,
    /// log at debug level (unless CALIOPEN_IMAP_LOG says otherwise)
    #[argh(switch, short = 'v')]
    pub verbose: bool,
    /// print the version and exit
    #[argh(switch, short = 'V')]
    pub version: bool,
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
    /// configuration: a file, or a name looked up as NAME.yaml in --configpath,
    /// $CALIOPENROOT/src/backend/configs and . (as the Go binaries did)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,
    /// directory searched first for the -c NAME configuration
    #[argh(option)]
    pub configpath: Option<PathBuf>,
    /// log at debug level (unless CALIOPEN_IMAP_LOG says otherwise)
    #[argh(switch, short = 'v')]
    pub verbose: bool,
    /// print the version and exit
    #[argh(switch, short = 'V')]
    pub version: bool,
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
    Unlock(UnlockArgs),
    Status(StatusArgs),
    Retry(RetryArgs),
    Config(ShowConfigArgs),
}

/// create a remote identity in Cassandra and schedule it on the poller
#[derive(FromArgs)]
#[argh(subcommand, name = "addremote")]
pub struct AddRemoteArgs {
    /// remote IMAP login (also the identity's identifier)
    #[argh(option, short = 'l')]
    pub login: String,
    /// IMAP password (visible in `ps`: prefer --pass-env, --pass-file or the prompt)
    #[argh(option, short = 'p')]
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
    #[argh(option, short = 's')]
    pub server: String,
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option, short = 'u')]
    pub username: Option<String>,
    /// display name of the identity (default: the login)
    #[argh(option, short = 'd')]
    pub display: Option<String>,
    /// mailbox(es) to sync, comma-separated (default INBOX)
    #[argh(option, short = 'm')]
    pub mailbox: Option<String>,
    /// minutes between two scheduled syncs, or a cron expression (default 15)
    #[argh(option)]
    pub pollinterval: Option<String>,
    /// watch INBOX with IDLE, so new mail is synced at once (with imap.idle: identity)
    #[argh(switch)]
    pub idle: bool,
}

/// order a sync of a stored remote identity (needs a running imapworker)
#[derive(FromArgs)]
#[argh(subcommand, name = "syncremote")]
pub struct SyncRemoteArgs {
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option, short = 'u')]
    pub username: Option<String>,
    /// the identity's identifier (its login)
    #[argh(option)]
    pub identifier: Option<String>,
    /// the identity's id (UUID), instead of --identifier
    #[argh(option, short = 'r')]
    pub remoteid: Option<String>,
    /// IMAP password for this run (when none is stored)
    #[argh(option, short = 'p')]
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
    #[argh(option, short = 'l')]
    pub login: String,
    /// IMAP password (visible in `ps`: prefer --pass-env, --pass-file or the prompt)
    #[argh(option, short = 'p')]
    pub pass: Option<String>,
    /// read the password from this environment variable
    #[argh(option)]
    pub pass_env: Option<String>,
    /// read the password from the first line of this file
    #[argh(option)]
    pub pass_file: Option<PathBuf>,
    /// remote IMAP server, host:port
    #[argh(option, short = 's')]
    pub server: String,
    /// mailbox to fetch (default INBOX)
    #[argh(option, short = 'm', default = "String::from(\"INBOX\")")]
    pub mailbox: String,
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option, short = 'u')]
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
    #[argh(option, short = 'u')]
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
    #[argh(option, short = 'u')]
    pub username: Option<String>,
    /// the identity's identifier (its login)
    #[argh(option)]
    pub identifier: Option<String>,
    /// the identity's id (UUID), instead of --identifier
    #[argh(option, short = 'r')]
    pub remoteid: Option<String>,
}

/// clear a sync lock (and Caliopen's syncing marker) left by a stopped sync
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "unlock")]
pub struct UnlockArgs {
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option, short = 'u')]
    pub username: Option<String>,
    /// the identity's identifier (its login)
    #[argh(option)]
    pub identifier: Option<String>,
    /// the identity's id (UUID), instead of --identifier
    #[argh(option, short = 'r')]
    pub remoteid: Option<String>,
    /// clear the lock and the marker even if a sync is still renewing them
    #[argh(switch)]
    pub force: bool,
}

/// the health of remote identities (exit 1 when any shown is unhealthy).
///
/// Unhealthy: inactive; an error streak (errorsCount > 0 or lastFetchError
/// set); stepped-over messages; folder errors; a stale sync lock. NEXT DUE is
/// computed from last_check + pollinterval, as the leading poller computes
/// it (the poller's own schedule lives in its memory).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct StatusArgs {
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option, short = 'u')]
    pub username: Option<String>,
    /// every remote identity of every user (a paged scan of user_identity)
    #[argh(switch)]
    pub all: bool,
    /// show only the unhealthy identities
    #[argh(switch)]
    pub unhealthy: bool,
    /// print JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// hand off again an identity's stepped-over and undelivered raw messages,
/// each once, under its sync lock: the way back after a processor fault.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "retry")]
pub struct RetryArgs {
    /// local Caliopen user id (UUID)
    #[argh(option)]
    pub userid: Option<String>,
    /// local Caliopen user name, instead of --userid
    #[argh(option, short = 'u')]
    pub username: Option<String>,
    /// the identity's identifier (its login)
    #[argh(option)]
    pub identifier: Option<String>,
    /// the identity's id (UUID), instead of --identifier
    #[argh(option, short = 'r')]
    pub remoteid: Option<String>,
}

// ------------------------------------------------------------------ parsing

/// What parsing the command line gave.
pub enum Parsed<T> {
    Args(T),
    /// Help was printed (the caller exits with success).
    Helped,
    /// A usage error was printed (the caller exits with the usage code).
    Misused,
}

/// Parse `args` (without the program name) for the command called `name`.
/// Help goes to stdout ([`Parsed::Helped`]); a usage error to stderr as one
/// line ([`Parsed::Misused`]).
pub fn parse<T: FromArgs>(name: &str, args: &[String]) -> Parsed<T> {
    let args = split_equals(args);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    match T::from_args(&[name], &refs) {
        Ok(t) => Parsed::Args(t),
        Err(early) => match early.status {
            Ok(()) => {
                println!("{}", early.output);
                Parsed::Helped
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
                Parsed::Misused
            }
        },
    }
}

/// The command line after [`hoist_globals`], and what it found.
#[derive(Debug, PartialEq, Eq)]
pub struct Hoisted {
    /// The words to hand to argh: persistent flags first, then the rest.
    pub args: Vec<String>,
    /// `-V`, `--version` or a `version` command was given.
    pub version: bool,
    /// `-v` or `--verbose` was given.
    pub verbose: bool,
}

/// The Go binaries' persistent flags (cobra): valid before or after the
/// command. `-c NAME`, `--configpath DIR`, `-v`, `-V`.
const GLOBAL_OPTIONS: &[&str] = &["-c", "--config", "--configpath"];
const GLOBAL_SWITCHES: &[&str] = &["-v", "--verbose", "-V", "--version"];
/// Every flag of any mode that takes no value; any other flag takes the next
/// word as its value. A switch added to the structs above goes here too,
/// else the word after it is read as its value.
const SWITCHES: &[&str] = &["--help", "-h", "--wait", "--json", "--no-pass", "--force"];

/// Move the persistent flags (and their values) in front of the command,
/// where argh wants a struct's own options, so `imapworker start -c imapworker
/// --configpath /etc/caliopen` parses as cobra parsed it. argh has no
/// persistent flags; this is the one place that reorders words. Values of
/// other options are skipped, never taken for flags (`--pass -v` keeps `-v`
/// as the password), and nothing after `--` is touched.
pub fn hoist_globals(args: &[String]) -> Hoisted {
    let args = split_equals(args);
    let mut globals = Vec::new();
    let mut rest = Vec::with_capacity(args.len());
    let (mut version, mut verbose) = (false, false);
    let mut seen_command = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" {
            rest.extend_from_slice(&args[i..]);
            break;
        }
        if GLOBAL_OPTIONS.contains(&a) && i + 1 < args.len() {
            globals.push(args[i].clone());
            globals.push(args[i + 1].clone());
            i += 2;
            continue;
        }
        if GLOBAL_SWITCHES.contains(&a) {
            match a {
                "-V" | "--version" => version = true,
                _ => verbose = true,
            }
            globals.push(args[i].clone());
            i += 1;
            continue;
        }
        if a.starts_with('-') && a.len() > 1 && !SWITCHES.contains(&a) {
            // An option with its value: both stay where they are.
            rest.extend_from_slice(&args[i..(i + 2).min(args.len())]);
            i += 2;
            continue;
        }
        if !a.starts_with('-') && !seen_command {
            seen_command = true;
            // cobra's `version` command.
            version |= a == "version";
        }
        rest.push(args[i].clone());
        i += 1;
    }
    globals.extend(rest);
    Hoisted {
        args: globals,
        version,
        verbose,
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
    fn persistent_flags_move_before_the_command() {
        // Caliopen's Dockerfile.imap-worker entrypoint.
        let h = hoist_globals(&s(&[
            "start",
            "-c",
            "imapworker",
            "--configpath",
            "/etc/caliopen",
            "-p",
            "/imapworker.pid",
        ]));
        assert_eq!(
            h.args,
            s(&[
                "-c",
                "imapworker",
                "--configpath",
                "/etc/caliopen",
                "start",
                "-p",
                "/imapworker.pid"
            ])
        );
        assert!(!h.version && !h.verbose);
        let Parsed::Args(WorkerArgs {
            config,
            configpath,
            cmd: WorkerCmd::Start(st),
            ..
        }) = parse::<WorkerArgs>("imapworker", &h.args)
        else {
            panic!("did not parse")
        };
        assert_eq!(config, Some(PathBuf::from("imapworker")));
        assert_eq!(configpath, Some(PathBuf::from("/etc/caliopen")));
        assert_eq!(st.pid_file, Some(PathBuf::from("/imapworker.pid")));
    }

    #[test]
    fn values_are_never_taken_for_flags() {
        let h = hoist_globals(&s(&[
            "syncremote",
            "-p",
            "-v",
            "--pass-env",
            "-c",
            "--config=x.yaml",
            "--wait",
            "-v",
            "--",
            "-V",
        ]));
        assert_eq!(
            h.args,
            s(&[
                "--config",
                "x.yaml",
                "-v",
                "syncremote",
                "-p",
                "-v",
                "--pass-env",
                "-c",
                "--wait",
                "--",
                "-V"
            ])
        );
        assert!(h.verbose);
        assert!(!h.version, "-V after -- is not a flag");
    }

    #[test]
    fn version_in_any_place_or_as_a_command() {
        assert!(hoist_globals(&s(&["start", "-V"])).version);
        assert!(hoist_globals(&s(&["--version"])).version);
        assert!(hoist_globals(&s(&["version"])).version);
        assert!(!hoist_globals(&s(&["syncremote", "--username", "version"])).version);
    }

    #[test]
    fn ctl_go_short_flags_of_addremote() {
        let h = hoist_globals(&s(&[
            "addremote",
            "-u",
            "alice",
            "-s",
            "imap.b.c:993",
            "-l",
            "a@b.c",
            "-p",
            "pw",
            "-m",
            "Archive",
            "-d",
            "Alice",
            "-c",
            "imapworker",
        ]));
        let Parsed::Args(CtlArgs {
            config,
            cmd: CtlCmd::AddRemote(a),
            ..
        }) = parse::<CtlArgs>("imapctl", &h.args)
        else {
            panic!("did not parse")
        };
        assert_eq!(config, Some(PathBuf::from("imapworker")));
        assert_eq!(
            (a.username.as_deref(), a.server.as_str(), a.login.as_str()),
            (Some("alice"), "imap.b.c:993", "a@b.c")
        );
        assert_eq!(
            (
                a.pass.as_deref(),
                a.mailbox.as_deref(),
                a.display.as_deref()
            ),
            (Some("pw"), Some("Archive"), Some("Alice"))
        );
    }

    #[test]
    fn ctl_go_short_flags_of_syncremote() {
        let h = hoist_globals(&s(&["syncremote", "-u", "alice", "-r", "r-1", "-p", "pw"]));
        let Parsed::Args(CtlArgs {
            cmd: CtlCmd::SyncRemote(a),
            ..
        }) = parse::<CtlArgs>("imapctl", &h.args)
        else {
            panic!("did not parse")
        };
        assert_eq!(
            (
                a.username.as_deref(),
                a.remoteid.as_deref(),
                a.pass.as_deref()
            ),
            (Some("alice"), Some("r-1"), Some("pw"))
        );
    }

    #[test]
    fn ctl_go_short_flags_of_fullfetch() {
        let h = hoist_globals(&s(&[
            "fullfetch",
            "-u",
            "alice",
            "-s",
            "h:993",
            "-m",
            "Box",
            "-l",
            "a@b.c",
            "-p",
            "pw",
        ]));
        let Parsed::Args(CtlArgs {
            cmd: CtlCmd::FullFetch(a),
            ..
        }) = parse::<CtlArgs>("imapctl", &h.args)
        else {
            panic!("did not parse")
        };
        assert_eq!(
            (a.username.as_deref(), a.server.as_str(), a.mailbox.as_str()),
            (Some("alice"), "h:993", "Box")
        );
        assert_eq!((a.login.as_str(), a.pass.as_deref()), ("a@b.c", Some("pw")));
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
    fn imapctl_reads_imapworkers_file() {
        assert_eq!(Mode::Ctl.config_name(), "imapworker");
        assert_eq!(Mode::Poller.config_name(), "idpoller");
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::from_program("imapctl"), Some(Mode::Ctl));
        assert_eq!(Mode::from_subcommand("poller"), Some(Mode::Poller));
        assert_eq!(Mode::from_subcommand("imapctl"), None);
    }
}
