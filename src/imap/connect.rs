//! Connect and log in: implicit TLS (993) or STARTTLS (143), certificate
//! verified, then LOGIN or XOAUTH2; capabilities read so Gmail gets its
//! extra fetch items.
//!
//! Every network step has a timeout, and every failure comes back as an
//! [`ImapError`] naming the server and the step, so an operator reading the
//! identity's `lastFetchError` knows what went wrong.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{throttle, tls, ImapError};
use crate::config::split_host_port;

/// TCP keepalive of every IMAP socket: a peer that stopped answering is
/// given up after about 2 minutes of silence (60 s, then 4 probes 15 s
/// apart), where an IDLE session would otherwise notice it only when it
/// next writes, at the re-IDLE (`imap.idle_renew_secs`, 25 minutes). The
/// probes are empty TCP segments every minute of an idle connection: no
/// load on any server. Constants rather than settings: nothing in an
/// account calls for other values.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(15))
    .with_retries(4);

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS from the first byte (port 993).
    Tls,
    /// Plain TCP upgraded with STARTTLS before login (port 143).
    StartTls,
    /// No TLS at all: only when allowed, and only to loopback.
    Plain,
}

impl Security {
    /// From an explicit setting (`tls`, `starttls`, `plain`), else by port:
    /// 143 means STARTTLS, anything else implicit TLS.
    pub fn choose(setting: &str, port: u16) -> Result<Security, String> {
        match setting.trim().to_ascii_lowercase().as_str() {
            "" => Ok(if port == 143 {
                Security::StartTls
            } else {
                Security::Tls
            }),
            "tls" | "ssl" | "imaps" => Ok(Security::Tls),
            "starttls" => Ok(Security::StartTls),
            "plain" | "none" => Ok(Security::Plain),
            other => Err(format!(
                "security must be tls, starttls or plain, found {other:?}"
            )),
        }
    }
}

/// How to log in.
#[derive(Clone)]
pub enum Auth {
    Login { user: String, password: String },
    XOAuth2 { user: String, token: String },
}

// Never print secrets.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Login { user, .. } => write!(f, "Login({user}, <password>)"),
            Auth::XOAuth2 { user, .. } => write!(f, "XOAuth2({user}, <token>)"),
        }
    }
}

impl Auth {
    pub fn user(&self) -> &str {
        match self {
            Auth::Login { user, .. } | Auth::XOAuth2 { user, .. } => user,
        }
    }
}

/// Everything needed to reach and log in to one account.
#[derive(Debug, Clone)]
pub struct Account {
    /// `host:port` as configured (`inserver`).
    pub server: String,
    pub security: Security,
    pub auth: Auth,
    /// Extra CA files to trust (global and per identity).
    pub ca_files: Vec<PathBuf>,
    /// Pinned certificate SHA-256, if any.
    pub pin: Option<[u8; 32]>,
    pub allow_plaintext_loopback: bool,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

/// What we learnt while connecting (for the X-Fetched-Imap header and Gmail).
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub remote_addr: String,
    pub tls_version: String,
    pub cipher: String,
    pub imap4rev1: bool,
    pub gmail: bool,
    /// The extensions a cheap resync and the folder listing use, read once
    /// at login so no later step asks CAPABILITY again.
    pub caps: Extensions,
}

/// Server extensions we act on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    pub condstore: bool,
    pub qresync: bool,
    pub enable: bool,
    /// RFC 5819: STATUS of every folder in the LIST answer.
    pub list_status: bool,
    pub list_extended: bool,
    pub special_use: bool,
    /// RFC 2177: live sync needs it.
    pub idle: bool,
    /// RFC 5465: live sync watches every folder over one connection.
    pub notify: bool,
    /// RFC 3691: leave a mailbox without CLOSE's implicit expunge.
    pub unselect: bool,
}

impl Extensions {
    pub fn from_caps(has: impl Fn(&str) -> bool) -> Extensions {
        Extensions {
            // QRESYNC implies CONDSTORE (RFC 7162 §3.2.3).
            condstore: has("CONDSTORE") || has("QRESYNC"),
            qresync: has("QRESYNC") && has("ENABLE"),
            enable: has("ENABLE"),
            list_status: has("LIST-STATUS"),
            list_extended: has("LIST-EXTENDED"),
            special_use: has("SPECIAL-USE"),
            idle: has("IDLE"),
            notify: has("NOTIFY"),
            unselect: has("UNSELECT"),
        }
    }
}

/// The transport under the IMAP session.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket under the stream.
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// The TCP keepalive of the socket as the kernel has it, `None` when
    /// SO_KEEPALIVE is off: what the tests check, and a way to see it.
    pub fn keepalive(&self) -> std::io::Result<Option<Keepalive>> {
        let sock = socket2::SockRef::from(self.tcp());
        if !sock.keepalive()? {
            return Ok(None);
        }
        Ok(Some(Keepalive {
            idle: sock.tcp_keepalive_time()?,
            interval: sock.tcp_keepalive_interval()?,
            probes: sock.tcp_keepalive_retries()?,
        }))
    }
}

/// TCP keepalive settings of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before the first probe.
    pub idle: Duration,
    /// Time between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes before the kernel drops the connection.
    pub probes: u32,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stream::Plain(_) => f.write_str("Stream::Plain"),
            Stream::Tls(_) => f.write_str("Stream::Tls"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub type ImapSession = async_imap::Session<Stream>;

struct XOAuth2<'a> {
    user: &'a str,
    token: &'a str,
}

impl async_imap::Authenticator for XOAuth2<'_> {
    type Response = String;
    fn process(&mut self, _challenge: &[u8]) -> String {
        format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.token)
    }
}

/// Connect, secure, log in; the session and what we learnt on the way.
pub async fn connect(acc: &Account) -> Result<(ImapSession, ConnInfo), ImapError> {
    let (host, port) = split_host_port(&acc.server, 993).map_err(|e| ImapError::Connect {
        server: acc.server.clone(),
        reason: e,
    })?;
    let dial = Dial { acc, host };
    let (tcp, peer) = dial.tcp(port).await?;
    let mut info = ConnInfo {
        remote_addr: peer.to_string(),
        ..Default::default()
    };
    dial.check_plaintext(peer)?;
    let client = dial.secure(tcp).await?;
    if let Stream::Tls(tls) = client.get_ref() {
        let (_, conn) = tls.get_ref();
        info.tls_version = tls::version_name(conn.protocol_version()).to_string();
        info.cipher = tls::suite_name(conn.negotiated_cipher_suite());
    }
    let mut session = dial.log_in(client).await?;
    super::sent("CAPABILITY");
    let caps = tokio::time::timeout(acc.io_timeout, session.capabilities())
        .await
        .map_err(|_| dial.timeout("CAPABILITY"))?
        .map_err(|e| dial.proto("CAPABILITY", e.to_string()))?;
    info.imap4rev1 = caps.has_str("IMAP4rev1");
    info.gmail = caps.has_str("X-GM-EXT-1");
    info.caps = Extensions::from_caps(|c| caps.has_str(c));
    Ok((session, info))
}

/// One connection attempt's steps, each failing with the server named.
struct Dial<'a> {
    acc: &'a Account,
    host: String,
}

impl Dial<'_> {
    fn server(&self) -> String {
        self.acc.server.clone()
    }

    fn timeout(&self, during: &str) -> ImapError {
        ImapError::Timeout {
            server: self.server(),
            during: during.to_string(),
        }
    }

    fn proto(&self, during: &str, reason: String) -> ImapError {
        ImapError::Protocol {
            server: self.server(),
            during: during.to_string(),
            reason,
        }
    }

    fn throttled(&self, during: &str, reason: throttle::Reason, text: String) -> ImapError {
        ImapError::Throttled {
            server: self.server(),
            during: during.to_string(),
            reason,
            text,
        }
    }

    /// A refused login: the account's failure, unless the server's words
    /// are load ([`throttle::classify`]) or it hung up without answering
    /// (a `BYE`, which async-imap reads past, then the connection closes;
    /// or a close that races our write of LOGIN).
    fn login_error(&self, e: async_imap::error::Error) -> ImapError {
        use async_imap::error::Error;
        use std::io::ErrorKind;
        let text = throttle::server_text(&e);
        let reason = match &e {
            Error::No(_) | Error::Bad(_) => throttle::classify(&text),
            Error::ConnectionLost => Some(throttle::Reason::Bye),
            Error::Io(io)
                if matches!(
                    io.kind(),
                    ErrorKind::BrokenPipe
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::UnexpectedEof
                ) =>
            {
                Some(throttle::Reason::Bye)
            }
            _ => None,
        };
        match reason {
            Some(r) => self.throttled("login", r, text),
            None => ImapError::Auth {
                server: self.server(),
                login: self.acc.auth.user().to_string(),
                reason: e.to_string(),
            },
        }
    }

    fn unreachable(&self, reason: impl ToString) -> ImapError {
        ImapError::Connect {
            server: self.server(),
            reason: reason.to_string(),
        }
    }

    /// The TCP connection and the address it reached.
    async fn tcp(&self, port: u16) -> Result<(TcpStream, SocketAddr), ImapError> {
        let tcp = tokio::time::timeout(
            self.acc.connect_timeout,
            TcpStream::connect((self.host.as_str(), port)),
        )
        .await
        .map_err(|_| self.timeout("connect"))?
        .map_err(|e| self.unreachable(e))?;
        let _ = tcp.set_nodelay(true);
        // Without it a connection a NAT or firewall dropped silently looks
        // alive until we next write: for an IDLE session, at the re-IDLE.
        // Its failure costs only that, so the connection goes on.
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&KEEPALIVE) {
            tracing::warn!(server = %self.acc.server, error = %e, "cannot turn TCP keepalive on");
        }
        let peer = tcp.peer_addr().map_err(|e| self.unreachable(e))?;
        Ok((tcp, peer))
    }

    /// Plaintext only to loopback, and only when allowed.
    fn check_plaintext(&self, peer: SocketAddr) -> Result<(), ImapError> {
        let acc = self.acc;
        if acc.security == Security::Plain
            && !(acc.allow_plaintext_loopback && peer.ip().is_loopback())
        {
            return Err(ImapError::Policy {
                server: self.server(),
                reason: "plaintext IMAP is allowed only to loopback addresses, and only with \
                         imap.allow_plaintext_loopback: true"
                    .into(),
            });
        }
        Ok(())
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, ImapError> {
        let files: Vec<&std::path::Path> = self.acc.ca_files.iter().map(PathBuf::as_path).collect();
        // A trust store we cannot build is a fault of this machine or of
        // our settings, never of the remote account.
        // Shared: a config lives as long as its connection (rustls keeps
        // it), and one per connection was most of a held session's memory.
        tls::shared_client_config(&files, self.acc.pin).map_err(|reason| ImapError::Policy {
            server: self.server(),
            reason,
        })
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<Stream, ImapError> {
        let tls = handshake(
            tcp,
            &self.host,
            self.tls_config()?,
            self.acc,
            &self.acc.server,
        )
        .await?;
        Ok(Stream::Tls(Box::new(tls)))
    }

    /// TLS as the account says (implicit, or STARTTLS after the greeting),
    /// and the server's greeting checked.
    async fn secure(&self, tcp: TcpStream) -> Result<async_imap::Client<Stream>, ImapError> {
        let acc = self.acc;
        let stream = match acc.security {
            Security::Tls => self.handshake(tcp).await?,
            Security::Plain | Security::StartTls => Stream::Plain(tcp),
        };
        let mut client = async_imap::Client::new(stream);
        let greeting = tokio::time::timeout(acc.connect_timeout, client.read_response())
            .await
            .map_err(|_| self.timeout("greeting"))?
            .map_err(|e| self.unreachable(e))?
            .ok_or_else(|| self.proto("greeting", "connection closed".into()))?;
        check_greeting(greeting.parsed()).map_err(|e| match e {
            Greeting::Bye(text) => self.throttled("greeting", throttle::classify_bye(&text), text),
            Greeting::Unexpected(r) => self.proto("greeting", r),
        })?;
        if acc.security != Security::StartTls {
            return Ok(client);
        }
        super::sent("STARTTLS");
        tokio::time::timeout(
            acc.io_timeout,
            client.run_command_and_check_ok("STARTTLS", None),
        )
        .await
        .map_err(|_| self.timeout("STARTTLS"))?
        .map_err(|e| ImapError::Tls {
            server: self.server(),
            reason: format!("STARTTLS refused: {e}"),
        })?;
        let Stream::Plain(tcp) = client.into_inner() else {
            unreachable!("STARTTLS starts from a plain stream")
        };
        Ok(async_imap::Client::new(self.handshake(tcp).await?))
    }

    /// LOGIN or XOAUTH2; a refusal is the account's failure.
    async fn log_in(&self, client: async_imap::Client<Stream>) -> Result<ImapSession, ImapError> {
        let acc = self.acc;
        let auth_err = |e: async_imap::error::Error| self.login_error(e);
        super::sent(match acc.auth {
            Auth::Login { .. } => "LOGIN",
            Auth::XOAuth2 { .. } => "AUTHENTICATE",
        });
        let login = async {
            match &acc.auth {
                Auth::Login { user, password } => client
                    .login(user, password)
                    .await
                    .map_err(|(e, _)| auth_err(e)),
                Auth::XOAuth2 { user, token } => client
                    .authenticate("XOAUTH2", XOAuth2 { user, token })
                    .await
                    .map_err(|(e, _)| auth_err(e)),
            }
        };
        tokio::time::timeout(acc.io_timeout, login)
            .await
            .map_err(|_| self.timeout("login"))?
    }
}

async fn handshake(
    tcp: TcpStream,
    host: &str,
    config: Arc<rustls::ClientConfig>,
    acc: &Account,
    server: &str,
) -> Result<TlsStream<TcpStream>, ImapError> {
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| ImapError::Tls {
            server: server.to_string(),
            reason: format!("bad server name {host:?}: {e}"),
        })?;
    let connector = TlsConnector::from(config);
    tokio::time::timeout(acc.connect_timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| ImapError::Timeout {
            server: server.to_string(),
            during: "TLS handshake".into(),
        })?
        .map_err(|e| ImapError::Tls {
            server: server.to_string(),
            reason: describe_tls_error(&e),
        })
}

fn describe_tls_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        format!(
            "{text} (the server certificate is not trusted: add its CA with imap.ca_file \
             or the identity's cafile, or pin it with cert_sha256)"
        )
    } else {
        text
    }
}

/// A greeting we cannot go on from.
enum Greeting {
    /// `* BYE`, with the server's words: it will not serve us now.
    Bye(String),
    Unexpected(String),
}

fn check_greeting(resp: &async_imap::imap_proto::Response<'_>) -> Result<(), Greeting> {
    use async_imap::imap_proto::{Response, Status};
    match resp {
        Response::Data {
            status: Status::Ok | Status::PreAuth,
            ..
        } => Ok(()),
        Response::Data {
            status: Status::Bye,
            outcome,
        } => Err(Greeting::Bye(format!(
            "server said BYE: {}",
            outcome.information.as_deref().unwrap_or("")
        ))),
        other => Err(Greeting::Unexpected(format!(
            "unexpected greeting {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_by_port_and_setting() {
        assert_eq!(Security::choose("", 993).unwrap(), Security::Tls);
        assert_eq!(Security::choose("", 143).unwrap(), Security::StartTls);
        assert_eq!(
            Security::choose("STARTTLS", 10143).unwrap(),
            Security::StartTls
        );
        assert_eq!(Security::choose("plain", 143).unwrap(), Security::Plain);
        assert!(Security::choose("bogus", 1).is_err());
    }

    /// Every connection with the same trust uses one rustls config: one
    /// root store in memory, not one per held connection.
    #[test]
    fn connections_share_their_tls_config() {
        let acc = Account {
            server: "127.0.0.1:993".into(),
            security: Security::Tls,
            auth: Auth::Login {
                user: "u".into(),
                password: "p".into(),
            },
            ca_files: vec![],
            pin: None,
            allow_plaintext_loopback: false,
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(1),
        };
        let dial = |acc| Dial {
            acc,
            host: "127.0.0.1".into(),
        };
        let (a, b) = (dial(&acc).tls_config(), dial(&acc).tls_config());
        assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let a = Auth::Login {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
