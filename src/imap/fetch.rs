//! Reading one mailbox: EXAMINE, UID SEARCH, and UID FETCH of sizes then
//! bodies, with the tagged status of every command checked.
//!
//! async-imap's `uid_fetch` and `uid_search` streams end at the tagged reply
//! without saying whether it was `OK`, `NO` or `BAD`, so a server that
//! refuses a message (Gmail and Exchange answer `NO` for some) or a whole
//! SEARCH looked like success. Here each command is sent with
//! `run_command` and its responses are read one by one until the tagged
//! reply, whose status is returned: `BAD` is a protocol error, `NO` is
//! reported to the caller with the server's text, so it can tell a message
//! that is gone from one that cannot be fetched.
//!
//! Every wait goes through one bounded step ([`step`]): limited by the I/O
//! timeout and ended early by the job's stop token, so a slow or silent
//! server never holds a job past a shutdown.
//!
//! Every untagged response read on the way is shown to [`super::news`]:
//! an EXISTS inside a FETCH answer may be the only word of new mail.
//!
//! Mailbox names are UTF-8 everywhere in this project and encoded to
//! modified UTF-7 (RFC 3501 §5.1.3) only here, on the wire.

use std::borrow::Cow;
use std::future::Future;
use std::ops::{Range, RangeInclusive};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use async_imap::imap_proto::{
    AttributeValue, MailboxDatum, RequestId, Response, ResponseCode, Status,
};

use super::{throttle, utf7, ImapError, ImapSession};
use crate::shutdown::Shutdown;

/// What EXAMINE says about a mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailboxInfo {
    pub uidvalidity: u32,
    pub uid_next: Option<u32>,
    pub exists: u32,
    /// From a CONDSTORE server (RFC 7162 §3.1.2.1).
    pub highestmodseq: Option<u64>,
}

/// Flag changes and expunges a QRESYNC EXAMINE reported (RFC 7162 §3.2.5),
/// bounded: at most [`Changes::cap`] entries are kept, the rest only counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// `VANISHED (EARLIER)` UIDs, as the server's ranges.
    pub vanished: Vec<RangeInclusive<u32>>,
    /// `(uid, flags as spelled, modseq)` of each FETCH answer.
    pub flags: Vec<(u32, Vec<String>, Option<u64>)>,
    /// Entries past the cap, not kept.
    pub dropped: u64,
    cap: usize,
}

impl Changes {
    pub fn with_cap(cap: usize) -> Changes {
        Changes {
            cap,
            ..Default::default()
        }
    }

    fn kept(&self) -> usize {
        self.flags.len() + self.vanished_count().min(usize::MAX as u64) as usize
    }

    /// How many UIDs the kept VANISHED ranges cover.
    pub fn vanished_count(&self) -> u64 {
        self.vanished
            .iter()
            .map(|r| u64::from(r.end().saturating_sub(*r.start())) + 1)
            .sum()
    }

    /// Take one untagged response of a QRESYNC EXAMINE.
    pub fn take(&mut self, resp: &Response<'_>) {
        match resp {
            Response::Vanished { uids, .. } => {
                for r in uids {
                    let (start, end) = ((*r.start()).min(*r.end()), (*r.start()).max(*r.end()));
                    let room = self.cap.saturating_sub(self.kept()) as u64;
                    let len = u64::from(end - start) + 1;
                    if room == 0 {
                        self.dropped += len;
                    } else if len <= room {
                        self.vanished.push(start..=end);
                    } else {
                        let last = start + (room - 1) as u32;
                        self.vanished.push(start..=last);
                        self.dropped += len - room;
                    }
                }
            }
            Response::Fetch(_, attrs) => {
                let mut uid = None;
                let mut flags = None;
                let mut modseq = None;
                for a in attrs {
                    match a {
                        AttributeValue::Uid(u) => uid = Some(*u),
                        AttributeValue::Flags(f) => {
                            flags = Some(f.iter().map(|s| s.to_string()).collect())
                        }
                        AttributeValue::ModSeq(m) => modseq = Some(*m),
                        _ => {}
                    }
                }
                if let (Some(uid), Some(flags)) = (uid, flags) {
                    if self.kept() < self.cap {
                        self.flags.push((uid, flags, modseq));
                    } else {
                        self.dropped += 1;
                    }
                }
            }
            _ => {}
        }
    }
}

/// One message read by a body FETCH.
#[derive(Debug)]
pub struct Body {
    pub uid: u32,
    /// The server's bytes, not copied: a view into the buffer the response
    /// was read into (see [`Body::held`]).
    pub data: Bytes,
    /// Bytes of memory this body keeps alive: the whole read buffer it is a
    /// view of (its size, rounded up to the reader's blocks).
    pub held: usize,
    /// Flags as the server spelled them (`\Seen`, `$Forwarded`...).
    pub flags: Vec<String>,
    pub gmail_msgid: Option<u64>,
    pub gmail_labels: Vec<String>,
}

/// How a command ended: `Ok`, or the server's `NO` text.
pub type Tagged = Result<(), String>;

/// A mailbox reader over one session.
pub struct Reader<'a> {
    session: &'a mut ImapSession,
    server: &'a str,
    io: Duration,
    stop: Shutdown,
}

impl<'a> Reader<'a> {
    pub fn new(
        session: &'a mut ImapSession,
        server: &'a str,
        io: Duration,
        stop: Shutdown,
    ) -> Self {
        Reader {
            session,
            server,
            io,
            stop,
        }
    }

    /// The server's name, for errors.
    pub fn server(&self) -> &str {
        self.server
    }

    /// EXAMINE `mailbox` (UTF-8). A `NO` (no such mailbox, not selectable)
    /// is [`ImapError::Mailbox`]: an error of that folder, not of the account.
    pub async fn examine(&mut self, mailbox: &str) -> Result<MailboxInfo, ImapError> {
        let wire = utf7::encode(mailbox);
        let during = format!("EXAMINE {mailbox}");
        let server = self.server.to_string();
        super::sent("EXAMINE");
        let r = step_raw(self.io, &mut self.stop, self.session.examine(&wire)).await;
        let mb = match r {
            Step::Done(Ok(mb)) => mb,
            Step::Done(Err(e @ async_imap::error::Error::No(_))) => {
                let text = throttle::server_text(&e);
                return Err(match throttle::classify(&text) {
                    Some(r) => throttled(&server, &during, r, text),
                    None => ImapError::Mailbox {
                        server,
                        mailbox: mailbox.to_string(),
                        reason: e.to_string(),
                    },
                });
            }
            Step::Done(Err(e)) => return Err(protocol(&server, &during, e.to_string())),
            Step::TimedOut => return Err(timeout(&server, &during)),
            Step::Stopped => return Err(ImapError::Interrupted),
        };
        super::news::opened(mailbox, mb.exists, mb.uid_next);
        Ok(MailboxInfo {
            uidvalidity: mb.uid_validity.unwrap_or(0),
            uid_next: mb.uid_next,
            exists: mb.exists,
            highestmodseq: mb.highest_modseq,
        })
    }

    /// EXAMINE `mailbox` with `(QRESYNC (uidvalidity modseq))` (RFC 7162
    /// §3.2.5), on a session where `ENABLE QRESYNC` succeeded: the server
    /// answers with the UIDs expunged since `modseq` (`VANISHED (EARLIER)`)
    /// and the flags of every message changed since, all kept in `changes`.
    /// When `uidvalidity` is not the mailbox's any more the server ignores
    /// the parameter and reports nothing, which is what we want then.
    pub async fn examine_qresync(
        &mut self,
        mailbox: &str,
        uidvalidity: u32,
        modseq: u64,
        changes: &mut Changes,
    ) -> Result<MailboxInfo, ImapError> {
        let param = format!("(QRESYNC ({uidvalidity} {modseq}))");
        self.examine_with(mailbox, &param, changes).await
    }

    /// EXAMINE `mailbox (CONDSTORE)` (RFC 7162 §3.1.8): the answer then
    /// carries the mailbox's HIGHESTMODSEQ whatever the server's habits,
    /// which the next sync compares STATUS with.
    pub async fn examine_condstore(&mut self, mailbox: &str) -> Result<MailboxInfo, ImapError> {
        let mut none = Changes::with_cap(0);
        self.examine_with(mailbox, "(CONDSTORE)", &mut none).await
    }

    /// EXAMINE with a parameter list, every answer read here: the mailbox's
    /// figures into the result, FETCH and VANISHED into `changes`. A `NO`
    /// is [`ImapError::Mailbox`], as for [`Reader::examine`].
    async fn examine_with(
        &mut self,
        mailbox: &str,
        param: &str,
        changes: &mut Changes,
    ) -> Result<MailboxInfo, ImapError> {
        let cmd = format!("EXAMINE {} {param}", quoted(&utf7::encode(mailbox)));
        let during = format!("EXAMINE {mailbox}");
        let mut info = MailboxInfo::default();
        let status = self
            .command(&cmd, |resp| match resp {
                Response::MailboxData(MailboxDatum::Exists(n)) => info.exists = *n,
                Response::Data {
                    status: Status::Ok,
                    outcome,
                } => match outcome.code {
                    Some(ResponseCode::UidValidity(v)) => info.uidvalidity = v,
                    Some(ResponseCode::UidNext(n)) => info.uid_next = Some(n),
                    Some(ResponseCode::HighestModSeq(m)) => info.highestmodseq = Some(m),
                    _ => {}
                },
                other => changes.take(other),
            })
            .await
            .map_err(|e| rename(e, &during))?;
        match status {
            Ok(()) => {
                super::news::opened(mailbox, info.exists, info.uid_next);
                Ok(info)
            }
            Err(reason) => Err(ImapError::Mailbox {
                server: self.server.to_string(),
                mailbox: mailbox.to_string(),
                reason,
            }),
        }
    }

    /// UIDs of `set` (a UID set such as `5:*`) that exist now, ascending.
    /// A `NO` is an error here: "cannot search" is not "empty mailbox".
    pub async fn search(&mut self, set: &str) -> Result<Vec<u32>, ImapError> {
        let during = format!("UID SEARCH UID {set}");
        let mut found = Vec::new();
        let status = self
            .command(&during, |resp| {
                if let Response::MailboxData(MailboxDatum::Search(ids)) = resp {
                    found.extend_from_slice(ids);
                }
            })
            .await?;
        if let Err(text) = status {
            return Err(protocol(self.server, &during, format!("NO {text}")));
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// The announced size of each message of `uids` the server answers for.
    pub async fn sizes(&mut self, uids: &[u32]) -> Result<(Vec<(u32, u32)>, Tagged), ImapError> {
        let during = "UID FETCH (UID RFC822.SIZE)";
        let mut out = Vec::with_capacity(uids.len());
        let status = self
            .command(
                &format!("UID FETCH {} (UID RFC822.SIZE)", uid_set(uids)),
                |resp| {
                    if let Response::Fetch(_, attrs) = resp {
                        let mut uid = None;
                        let mut size = None;
                        for a in attrs {
                            match a {
                                AttributeValue::Uid(u) => uid = Some(*u),
                                AttributeValue::Rfc822Size(s) => size = Some(*s),
                                _ => {}
                            }
                        }
                        if let (Some(u), Some(s)) = (uid, size) {
                            out.push((u, s));
                        }
                    }
                },
            )
            .await
            .map_err(|e| rename(e, during))?;
        Ok((out, status))
    }

    /// Start the body FETCH of `uids`; read the messages with
    /// [`Bodies::next`].
    pub async fn bodies<'r>(
        &'r mut self,
        uids: &[u32],
        gmail: bool,
    ) -> Result<Bodies<'r, 'a>, ImapError> {
        let items = if gmail {
            "(UID FLAGS BODY.PEEK[] X-GM-MSGID X-GM-LABELS)"
        } else {
            "(UID FLAGS BODY.PEEK[])"
        };
        let cmd = format!("UID FETCH {} {items}", uid_set(uids));
        let tag = self.send("UID FETCH", &cmd).await?;
        Ok(Bodies {
            reader: self,
            tag,
            status: None,
        })
    }

    /// Send `cmd` and return its tag.
    async fn send(&mut self, during: &str, cmd: &str) -> Result<RequestId, ImapError> {
        super::sent(super::command_name(cmd));
        let session = &mut *self.session;
        step(
            self.server,
            self.io,
            &mut self.stop,
            during,
            session.run_command(cmd),
        )
        .await
    }

    /// The next response of the command tagged `tag`, passed to `f` with
    /// the bytes it was parsed from: `Ok(Some((f(..), bytes)))` for an
    /// untagged one, `Ok(None)` once the tagged reply came (its status then
    /// in `status`). The bytes are handed back so a body can be kept without
    /// copying it.
    async fn next_with<T, F>(
        &mut self,
        during: &str,
        tag: &RequestId,
        status: &mut Option<Tagged>,
        f: F,
    ) -> Result<Option<(T, BytesMut)>, ImapError>
    where
        F: FnOnce(&Response<'_>, &[u8]) -> T,
    {
        if status.is_some() {
            return Ok(None);
        }
        let read = step_raw(self.io, &mut self.stop, self.session.read_response()).await;
        let resp = response(self.server, during, read)?;
        match resp.parsed() {
            Response::Done {
                tag: t,
                status: s,
                outcome,
            } if t == tag => {
                let text = outcome.information.as_deref().unwrap_or("").to_string();
                if let (Status::No | Status::Bad, Some(r)) = (s, throttle::classify(&text)) {
                    return Err(throttled(self.server, during, r, text));
                }
                match s {
                    Status::Ok => *status = Some(Ok(())),
                    Status::No => *status = Some(Err(text)),
                    _ => return Err(protocol(self.server, during, format!("{s:?} {text}"))),
                }
                Ok(None)
            }
            Response::Data {
                status: Status::Bye,
                outcome,
            } => Err(bye(self.server, during, outcome.information.as_deref())),
            parsed => {
                super::news::seen(parsed);
                let out = f(parsed, resp.borrow_owner());
                Ok(Some((out, resp.into_owner())))
            }
        }
    }

    /// Run `cmd` to its tagged reply, passing each untagged response to `on`.
    pub(crate) async fn command<F>(&mut self, cmd: &str, mut on: F) -> Result<Tagged, ImapError>
    where
        F: FnMut(&Response<'_>),
    {
        let tag = self.send(cmd, cmd).await?;
        let mut status = None;
        while self
            .next_with(cmd, &tag, &mut status, |r, _| on(r))
            .await?
            .is_some()
        {}
        Ok(status.unwrap_or(Ok(())))
    }

    /// Send `cmds` back to back, then read all their answers: one round
    /// trip for the lot (RFC 3501 §5.5 allows it for commands such as
    /// STATUS that change no state). Untagged responses go to `on`; each
    /// command's tagged status comes back in order. Every answer is read
    /// before returning, even after a `BAD`, so the session stays in step.
    pub(crate) async fn pipelined<F>(
        &mut self,
        cmds: &[String],
        mut on: F,
    ) -> Result<Vec<Tagged>, ImapError>
    where
        F: FnMut(&Response<'_>),
    {
        let mut tags = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            tags.push(self.send(cmd, cmd).await?);
        }
        let mut statuses: Vec<Option<Tagged>> = vec![None; tags.len()];
        let mut bad: Option<String> = None;
        let mut left = tags.len();
        while left > 0 {
            let read = step_raw(self.io, &mut self.stop, self.session.read_response()).await;
            let during = "pipelined commands";
            let resp = response(self.server, during, read)?;
            match resp.parsed() {
                Response::Done {
                    tag,
                    status,
                    outcome,
                } => {
                    let Some(i) = tags.iter().position(|t| t == tag) else {
                        continue;
                    };
                    if statuses[i].is_some() {
                        continue;
                    }
                    let text = outcome.information.as_deref().unwrap_or("").to_string();
                    statuses[i] = Some(match status {
                        Status::Ok => Ok(()),
                        Status::No => Err(text),
                        s => {
                            bad.get_or_insert_with(|| format!("{s:?} {text} (to {})", cmds[i]));
                            Err(text)
                        }
                    });
                    left -= 1;
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => return Err(bye(self.server, during, outcome.information.as_deref())),
                parsed => {
                    super::news::seen(parsed);
                    on(parsed)
                }
            }
        }
        if let Some(reason) = bad {
            return Err(protocol(self.server, "pipelined commands", reason));
        }
        Ok(statuses.into_iter().map(|s| s.unwrap_or(Ok(()))).collect())
    }

    /// Run any command to its tagged reply, passing each untagged response
    /// to `on`; a `NO` is an error here, named by `during` (which, like the
    /// command, must hold no secret).
    pub async fn run_checked<F>(&mut self, cmd: &str, during: &str, on: F) -> Result<(), ImapError>
    where
        F: FnMut(&Response<'_>),
    {
        match self.command(cmd, on).await.map_err(|e| rename(e, during))? {
            Ok(()) => Ok(()),
            Err(text) => Err(protocol(self.server, during, format!("NO {text}"))),
        }
    }
}

/// The responses of a body FETCH, message by message.
pub struct Bodies<'r, 'a> {
    reader: &'r mut Reader<'a>,
    tag: RequestId,
    status: Option<Tagged>,
}

impl Bodies<'_, '_> {
    /// The next message, or `None` at the tagged reply. FETCH responses
    /// without a body (flag updates) are passed over.
    pub async fn next(&mut self) -> Result<Option<Body>, ImapError> {
        loop {
            let next = self
                .reader
                .next_with(
                    "UID FETCH",
                    &self.tag,
                    &mut self.status,
                    |resp, raw| match resp {
                        Response::Fetch(_, attrs) => body_of(attrs, raw),
                        _ => None,
                    },
                )
                .await?;
            match next {
                None => return Ok(None),
                Some((Some((meta, data)), raw)) => return Ok(Some(meta.with_data(data, raw))),
                // Not a message with its body (a flag update, EXISTS...).
                Some((None, _)) => {}
            }
        }
    }

    /// How the FETCH ended; call after `next` returned `None`.
    pub fn status(&self) -> Tagged {
        self.status.clone().unwrap_or(Ok(()))
    }
}

/// A body FETCH response, read but not yet detached from its buffer.
struct Meta {
    uid: u32,
    flags: Vec<String>,
    gmail_msgid: Option<u64>,
    gmail_labels: Vec<String>,
}

/// Where the message bytes of a response are.
enum Data {
    /// At this range of the response's buffer (the usual case: a literal).
    At(Range<usize>),
    /// Elsewhere (a quoted string the parser had to unescape): a copy.
    Copied(Vec<u8>),
}

impl Meta {
    fn with_data(self, data: Data, raw: BytesMut) -> Body {
        let held = raw.capacity();
        let data = match data {
            Data::At(range) => raw.freeze().slice(range),
            Data::Copied(v) => Bytes::from(v),
        };
        Body {
            uid: self.uid,
            held: held.max(data.len()),
            data,
            flags: self.flags,
            gmail_msgid: self.gmail_msgid,
            gmail_labels: self.gmail_labels,
        }
    }
}

/// The message of a FETCH response parsed from `raw`, when it has one.
fn body_of(attrs: &[AttributeValue<'_>], raw: &[u8]) -> Option<(Meta, Data)> {
    let mut uid = None;
    let mut data: Option<&Cow<'_, [u8]>> = None;
    let mut flags = Vec::new();
    let mut gmail_msgid = None;
    let mut gmail_labels = Vec::new();
    for a in attrs {
        match a {
            AttributeValue::Uid(u) => uid = Some(*u),
            AttributeValue::BodySection {
                section: None,
                data: Some(d),
                ..
            } => data = Some(d),
            AttributeValue::Rfc822(Some(d)) => data = Some(d),
            AttributeValue::Flags(f) => flags = f.iter().map(|s| s.to_string()).collect(),
            AttributeValue::GmailMsgId(id) => gmail_msgid = Some(*id),
            AttributeValue::GmailLabels(l) => {
                gmail_labels = l.iter().map(|s| s.to_string()).collect()
            }
            _ => {}
        }
    }
    let data = data?;
    let meta = Meta {
        uid: uid?,
        flags,
        gmail_msgid,
        gmail_labels,
    };
    let data = match within(raw, data) {
        Some(range) => Data::At(range),
        None => Data::Copied(data.to_vec()),
    };
    Some((meta, data))
}

/// The range of `part` inside `whole`, when it is a slice of it.
fn within(whole: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// The response one bounded read brought, or why there is none: the
/// connection closed, the read failed or timed out, the stop token fired.
fn response<R, E: std::fmt::Display>(
    server: &str,
    during: &str,
    read: Step<Result<Option<R>, E>>,
) -> Result<R, ImapError> {
    match read {
        Step::Done(Ok(Some(r))) => Ok(r),
        Step::Done(Ok(None)) => Err(protocol(server, during, "connection closed".into())),
        Step::Done(Err(e)) => Err(protocol(server, during, e.to_string())),
        Step::TimedOut => Err(timeout(server, during)),
        Step::Stopped => Err(ImapError::Interrupted),
    }
}

/// The next response on `session`, passed to `f`: bounded by `io` but not
/// by a stop token, for IDLE, whose way out (DONE and its answer) must be
/// read even when stopping.
pub async fn next_response<T>(
    session: &mut ImapSession,
    server: &str,
    io: Duration,
    during: &str,
    f: impl FnOnce(&Response<'_>) -> T,
) -> Result<T, ImapError> {
    let read = match tokio::time::timeout(io, session.read_response()).await {
        Ok(r) => Step::Done(r),
        Err(_) => Step::TimedOut,
    };
    response(server, during, read).map(|r| f(r.parsed()))
}

/// How one bounded wait ended.
enum Step<T> {
    Done(T),
    TimedOut,
    Stopped,
}

async fn step_raw<T, F: Future<Output = T>>(io: Duration, stop: &mut Shutdown, fut: F) -> Step<T> {
    if stop.is_triggered() {
        return Step::Stopped;
    }
    tokio::select! {
        r = tokio::time::timeout(io, fut) => match r {
            Ok(v) => Step::Done(v),
            Err(_) => Step::TimedOut,
        },
        _ = stop.wait() => Step::Stopped,
    }
}

/// One IMAP wait: bounded by `io`, ended by `stop`, errors named by `during`.
pub async fn step<T, F>(
    server: &str,
    io: Duration,
    stop: &mut Shutdown,
    during: &str,
    fut: F,
) -> Result<T, ImapError>
where
    F: Future<Output = Result<T, async_imap::error::Error>>,
{
    match step_raw(io, stop, fut).await {
        Step::Done(Ok(v)) => Ok(v),
        Step::Done(Err(e)) => {
            let text = throttle::server_text(&e);
            match &e {
                async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_) => {
                    match throttle::classify(&text) {
                        Some(r) => Err(throttled(server, during, r, text)),
                        None => Err(protocol(server, during, e.to_string())),
                    }
                }
                _ => Err(protocol(server, during, e.to_string())),
            }
        }
        Step::TimedOut => Err(timeout(server, during)),
        Step::Stopped => Err(ImapError::Interrupted),
    }
}

fn protocol(server: &str, during: &str, reason: String) -> ImapError {
    ImapError::Protocol {
        server: server.to_string(),
        during: during.to_string(),
        reason,
    }
}

fn throttled(server: &str, during: &str, reason: throttle::Reason, text: String) -> ImapError {
    ImapError::Throttled {
        server: server.to_string(),
        during: during.to_string(),
        reason,
        text,
    }
}

/// An untagged `BYE` in the middle of a command: the server hangs up on
/// us, which is never the account's failure ([`throttle::classify_bye`]).
fn bye(server: &str, during: &str, why: Option<&str>) -> ImapError {
    let why = why.unwrap_or("(no reason given)");
    throttled(
        server,
        during,
        throttle::classify_bye(why),
        format!("BYE {why}"),
    )
}

fn timeout(server: &str, during: &str) -> ImapError {
    ImapError::Timeout {
        server: server.to_string(),
        during: during.to_string(),
    }
}

/// Name a long command by its short form in errors.
fn rename(e: ImapError, during: &str) -> ImapError {
    match e {
        ImapError::Protocol { server, reason, .. } => ImapError::Protocol {
            server,
            during: during.to_string(),
            reason,
        },
        ImapError::Timeout { server, .. } => ImapError::Timeout {
            server,
            during: during.to_string(),
        },
        ImapError::Throttled {
            server,
            reason,
            text,
            ..
        } => ImapError::Throttled {
            server,
            during: during.to_string(),
            reason,
            text,
        },
        e => e,
    }
}

/// `name` as an IMAP quoted string (names are mUTF-7, so ASCII; `"` and
/// `\\` escaped).
pub fn quoted(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `1:3,5,7:9` from UIDs (sorted and deduplicated here).
pub fn uid_set(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8, 9]), "1:3,5,7:9");
        assert_eq!(uid_set(&[9, 4, 4]), "4,9");
        assert_eq!(uid_set(&[]), "");
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted("INBOX"), "\"INBOX\"");
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn qresync_answers_are_kept_up_to_the_cap() {
        let mut c = Changes::with_cap(5);
        for line in [
            &b"* VANISHED (EARLIER) 3,7:9\r\n"[..],
            b"* 4 FETCH (UID 12 FLAGS (\\Seen $Label1) MODSEQ (90))\r\n",
            b"* VANISHED (EARLIER) 20:25\r\n",
            b"* 5 FETCH (UID 13 FLAGS (\\Flagged) MODSEQ (91))\r\n",
        ] {
            let (_, resp) = Response::parse(line).unwrap();
            c.take(&resp);
        }
        assert_eq!(c.vanished, vec![3..=3, 7..=9]);
        assert_eq!(
            c.flags,
            vec![(
                12,
                vec!["\\Seen".to_string(), "$Label1".to_string()],
                Some(90)
            )]
        );
        assert_eq!(c.vanished_count(), 4);
        // VANISHED 20:25 and the second FETCH came past the cap.
        assert_eq!(c.dropped, 7);
        let mut c = Changes::with_cap(3);
        let (_, resp) = Response::parse(b"* VANISHED (EARLIER) 1:10\r\n").unwrap();
        c.take(&resp);
        assert_eq!((c.vanished, c.dropped), (vec![1..=3], 7));
    }

    #[test]
    fn a_literal_body_stays_in_its_buffer() {
        let raw = BytesMut::from(&b"* 1 FETCH (UID 7 FLAGS (\\Seen) BODY[] {5}\r\nhello)\r\n"[..]);
        let (_, resp) = Response::parse(&raw).unwrap();
        let Response::Fetch(_, attrs) = resp else {
            panic!("not a FETCH: {resp:?}")
        };
        let (meta, data) = body_of(&attrs, &raw).unwrap();
        assert!(matches!(data, Data::At(_)), "the body was copied");
        let body = meta.with_data(data, raw.clone());
        assert_eq!((body.uid, &body.data[..]), (7, &b"hello"[..]));
        assert_eq!(body.flags, ["\\Seen"]);
        assert!(body.held >= raw.len());
    }

    #[test]
    fn a_quoted_body_is_copied() {
        let raw = BytesMut::from(&b"* 1 FETCH (UID 8 BODY[] \"hi\")\r\n"[..]);
        let (_, resp) = Response::parse(&raw).unwrap();
        let Response::Fetch(_, attrs) = resp else {
            panic!("not a FETCH: {resp:?}")
        };
        let (meta, data) = body_of(&attrs, &raw).unwrap();
        let body = meta.with_data(data, raw.clone());
        assert_eq!((body.uid, &body.data[..]), (8, &b"hi"[..]));
    }

    #[test]
    fn within_finds_only_slices_of_the_whole() {
        let whole = b"abcdef".to_vec();
        assert_eq!(within(&whole, &whole[2..4]), Some(2..4));
        assert_eq!(within(&whole, &whole[..0]), Some(0..0));
        let other = b"cd".to_vec();
        assert_eq!(within(&whole, &other), None);
    }
}
