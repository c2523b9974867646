//! Run one IMAP command and check its tagged reply.
//!
//! async-imap's typed streams (`list`, `uid_fetch`, `uid_search`) stop at the
//! tagged reply without saying whether it was `OK`, `NO` or `BAD`, so a
//! refused command looks like an empty answer. [`run_checked`] sends the
//! command itself, hands every untagged response to the caller, and turns a
//! tagged `NO`/`BAD`, a closed connection or a timeout into an [`ImapError`]
//! naming the server and the command.

use std::time::Duration;

use async_imap::imap_proto::{Response, Status};

use super::{ImapError, ImapSession};

/// Sends `command`, passes each untagged response to `on_untagged` until
/// the tagged reply, and checks that reply is `OK`.
///
/// The whole exchange shares one `io_timeout`, so a server that trickles
/// responses cannot hold the caller for longer than that. `during` names the
/// step in errors (e.g. `LIST`); it must not contain secrets, and neither
/// may `command`, which is never logged here but may be by async-imap's
/// trace output.
pub async fn run_checked<F>(
    session: &mut ImapSession,
    command: &str,
    server: &str,
    during: &str,
    io_timeout: Duration,
    mut on_untagged: F,
) -> Result<(), ImapError>
where
    F: FnMut(&Response<'_>) -> Result<(), String>,
{
    let proto = |reason: String| ImapError::Protocol {
        server: server.to_string(),
        during: during.to_string(),
        reason,
    };
    let exchange = async {
        let tag = session
            .run_command(command)
            .await
            .map_err(|e| proto(e.to_string()))?;
        loop {
            let resp = session
                .read_response()
                .await
                .map_err(|e| proto(e.to_string()))?
                .ok_or_else(|| proto("connection closed".into()))?;
            match resp.parsed() {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if *t == tag => {
                    let info = outcome.information.as_deref().unwrap_or("");
                    return match status {
                        Status::Ok => Ok(()),
                        Status::No => Err(proto(format!("NO {info}"))),
                        Status::Bad => Err(proto(format!("BAD {info}"))),
                        other => Err(proto(format!("{other:?} {info}"))),
                    };
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    let info = outcome.information.as_deref().unwrap_or("");
                    return Err(proto(format!("server said BYE: {info}")));
                }
                other => on_untagged(other).map_err(proto)?,
            }
        }
    };
    tokio::time::timeout(io_timeout, exchange)
        .await
        .map_err(|_| ImapError::Timeout {
            server: server.to_string(),
            during: during.to_string(),
        })?
}
