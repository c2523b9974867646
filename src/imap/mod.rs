//! The IMAP client side: secure connection and login ([`connect`]), TLS
//! policy ([`tls`]), the X-Fetched headers put on every message
//! ([`headers`]), mailbox names in modified UTF-7 ([`utf7`]), and the
//! folders a `mailboxes: *` identity syncs ([`folders`]).
//!
//! [`fetch`] reads a mailbox with every command's tagged status checked, and
//! holds the one bounded, stoppable IMAP step every reader uses; [`status`]
//! asks how every mailbox stands without opening it (STATUS, LIST-STATUS);
//! [`news`] notes new mail announced inside a sync's answers; [`notify`]
//! asks the server to announce changes in every folder (RFC 5465);
//! [`throttle`] tells a server's "not now" from a refusal of the account.
//! Every command sent is counted ([`sent`]). The worker's sync pipeline
//! drives the fetch and owns the checkpoint logic; this module only knows
//! how to talk to a server safely.

pub mod connect;
pub mod fetch;
pub mod folders;
pub mod headers;
pub mod news;
pub mod notify;
pub mod oauth;
pub mod status;
pub mod throttle;
pub mod tls;
pub mod utf7;

pub use connect::{connect, Account, Auth, ConnInfo, Extensions, ImapSession, Security};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

tokio::task_local! {
    /// The command count of the job running in this task, when it keeps one.
    static TALLY: Arc<AtomicU64>;
}

/// Note one IMAP command sent: the process's
/// `caliopen_imap_imap_commands_total{command}` and, inside [`tallied`],
/// the running job's own count. Every place our code sends a command
/// calls this, so "how many round trips did a sync cost" is measured, not
/// guessed.
pub fn sent(command: &'static str) {
    crate::metrics::imap_commands()
        .get_or_create(&crate::metrics::CommandLabel { command })
        .inc();
    let _ = TALLY.try_with(|t| t.fetch_add(1, Ordering::Relaxed));
}

/// Run `fut` with the commands it sends counted into `tally` as well. A
/// task-local rather than a parameter: commands are sent from many layers
/// (connect, folders, reader, logout) that share no job context, and a
/// job's IMAP work runs in its own task.
pub async fn tallied<F: std::future::Future>(tally: Arc<AtomicU64>, fut: F) -> F::Output {
    TALLY.scope(tally, fut).await
}

/// The metric name of a command line we send (its verb, `UID` included).
pub fn command_name(cmd: &str) -> &'static str {
    const KNOWN: [&str; 14] = [
        "UID FETCH",
        "UID SEARCH",
        "UID STORE",
        "LIST",
        "STATUS",
        "EXAMINE",
        "SELECT",
        "ENABLE",
        "NOOP",
        "CAPABILITY",
        "APPEND",
        "IDLE",
        "NOTIFY",
        "UNSELECT",
    ];
    let upper = cmd.trim_start().to_ascii_uppercase();
    KNOWN
        .iter()
        .find(|k| upper.starts_with(*k) && upper[k.len()..].chars().next().is_none_or(|c| c == ' '))
        .copied()
        .unwrap_or("OTHER")
}

/// IMAP failures the sync branches on (login errors count towards disabling
/// an identity, throttling never does; a TLS error never falls back to
/// anything weaker).
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("TLS with {server} failed: {reason}")]
    Tls { server: String, reason: String },
    #[error("login to {server} as {login} refused: {reason}")]
    Auth {
        server: String,
        login: String,
        reason: String,
    },
    #[error("{server} timed out during {during}")]
    Timeout { server: String, during: String },
    #[error("{server} answered badly to {during}: {reason}")]
    Protocol {
        server: String,
        during: String,
        reason: String,
    },
    #[error("refused by policy for {server}: {reason}")]
    Policy { server: String, reason: String },
    /// A mailbox the server will not open (missing, not selectable): an
    /// error of that folder, never of the whole account.
    #[error("mailbox {mailbox:?} on {server}: {reason}")]
    Mailbox {
        server: String,
        mailbox: String,
        reason: String,
    },
    /// The server answered with load, a limit or a `BYE` ([`throttle`]):
    /// transient, never the account's failure.
    #[error("{server} is throttling us ({reason}) at {during}: {text}")]
    Throttled {
        server: String,
        during: String,
        reason: throttle::Reason,
        text: String,
    },
    /// The job's stop token fired (shutdown, lost lock, deadline) while
    /// waiting on the server.
    #[error("interrupted")]
    Interrupted,
}

#[cfg(test)]
mod tests {
    use super::command_name;

    #[test]
    fn commands_sent_show_on_the_workers_metrics() {
        let tally = std::sync::Arc::new(super::AtomicU64::new(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(super::tallied(tally.clone(), async {
            super::sent("ENABLE");
            super::sent("ENABLE");
        }));
        super::sent("ENABLE"); // outside a job: the process count only
        assert_eq!(tally.load(super::Ordering::Relaxed), 2);
        let text = crate::metrics::WorkerMetrics::new().encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("caliopen_imap_imap_commands_total{command=\"ENABLE\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 3.0, "{line}");
    }

    #[test]
    fn command_names() {
        assert_eq!(command_name("UID FETCH 1:3 (UID FLAGS)"), "UID FETCH");
        assert_eq!(command_name("uid search UID 5:*"), "UID SEARCH");
        assert_eq!(
            command_name("LIST \"\" \"*\" RETURN (STATUS (UIDNEXT))"),
            "LIST"
        );
        assert_eq!(command_name("EXAMINE \"INBOX\" (QRESYNC (1 2))"), "EXAMINE");
        assert_eq!(command_name("ENABLE QRESYNC"), "ENABLE");
        assert_eq!(command_name("LISTX"), "OTHER");
        assert_eq!(command_name("XYZZY"), "OTHER");
    }
}
