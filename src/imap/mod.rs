//! The IMAP client side: secure connection and login ([`connect`]), TLS
//! policy ([`tls`]), the X-Fetched headers put on every message
//! ([`headers`]), mailbox names in modified UTF-7 ([`utf7`]), and the
//! folders a `mailboxes: *` identity syncs ([`folders`]).
//!
//! [`fetch`] reads a mailbox with every command's tagged status checked, and
//! holds the one bounded, stoppable IMAP step every reader uses. The
//! worker's sync pipeline drives the fetch and owns the checkpoint logic;
//! this module only knows how to talk to a server safely.

pub mod connect;
pub mod fetch;
pub mod folders;
pub mod headers;
pub mod oauth;
pub mod tls;
pub mod utf7;

pub use connect::{connect, Account, Auth, ConnInfo, ImapSession, Security};

/// IMAP failures the sync branches on (login errors count towards disabling
/// an identity; a TLS error never falls back to anything weaker).
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
    /// The job's stop token fired (shutdown, lost lock, deadline) while
    /// waiting on the server.
    #[error("interrupted")]
    Interrupted,
}
