//! Refreshing an OAuth2 access token (XOAUTH2 accounts such as Gmail).
//!
//! One form POST to the provider's token endpoint, with the refresh token
//! and the client credentials from `LDAConfig.Providers`. It takes a
//! minimal HTTP/1.1 client over the same verified TLS as IMAP: one request,
//! `Connection: close`, a JSON answer. The answer's head is parsed by
//! `httparse` (hyper's parser, no dependencies of its own); its body is
//! framed by `Content-Length` or chunks, so the answer is complete without
//! waiting for the connection to end (some providers close without a TLS
//! close_notify). That is all a token refresh needs, and it spares us a
//! full HTTP stack. Plain `http://` is accepted only for loopback addresses
//! with `imap.allow_plaintext_loopback` (tests).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tls;

/// Google's token endpoint, used for provider `gmail` when none is configured.
pub const GMAIL_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";

/// The longest token lifetime believed: a year. More is an error of the
/// provider, refused rather than stored.
pub const MAX_EXPIRES_IN: u32 = 365 * 24 * 3600;

/// What the endpoint gave back. Its `Debug` hides the tokens.
#[derive(Clone, serde::Deserialize)]
pub struct Token {
    pub access_token: String,
    #[serde(default)]
    pub token_type: String,
    /// Seconds; sent as a number or, by some providers, as a numeric string.
    #[serde(default, deserialize_with = "expires_in")]
    pub expires_in: Option<u32>,
    /// Some providers rotate the refresh token.
    #[serde(default)]
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"<hidden>")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// `expires_in` as a number of seconds (`3600`, `3600.0` or `"3600"`), from
/// 0 to [`MAX_EXPIRES_IN`]; anything else is an error naming the value.
fn expires_in<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    use serde::Deserialize;
    let v = serde_json::Value::deserialize(d)?;
    let secs: f64 = match &v {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        serde_json::Value::String(t) => t.trim().parse::<f64>().map_err(|_| {
            D::Error::custom(format!("expires_in is not a number of seconds: {t:?}"))
        })?,
        other => {
            return Err(D::Error::custom(format!(
                "expires_in is not a number of seconds: {other}"
            )))
        }
    };
    if !secs.is_finite() || secs.fract() != 0.0 {
        return Err(D::Error::custom(format!(
            "expires_in is not a whole number of seconds: {v}"
        )));
    }
    if secs < 0.0 {
        return Err(D::Error::custom(format!("expires_in is negative: {v}")));
    }
    if secs > f64::from(MAX_EXPIRES_IN) {
        return Err(D::Error::custom(format!(
            "expires_in {v} is more than a year: refused"
        )));
    }
    Ok(Some(secs as u32))
}

/// The client side of a refresh.
pub struct RefreshRequest<'a> {
    pub token_url: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub refresh_token: &'a str,
    pub ca_files: &'a [&'a Path],
    pub allow_plaintext_loopback: bool,
    pub timeout: Duration,
}

/// Ask for a new access token. Errors are one line, without secrets.
pub async fn refresh(req: &RefreshRequest<'_>) -> Result<Token, String> {
    let (tls_on, host, port, path) = parse_url(req.token_url)?;
    let body = format!(
        "grant_type=refresh_token&refresh_token={}&client_id={}&client_secret={}",
        form_escape(req.refresh_token),
        form_escape(req.client_id),
        form_escape(req.client_secret)
    );
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let work = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        if tls_on {
            let config = tls::client_config(req.ca_files, None)?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("bad host {host:?}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            exchange(stream, &request).await
        } else {
            let peer = tcp.peer_addr().map_err(|e| e.to_string())?;
            if !(req.allow_plaintext_loopback && peer.ip().is_loopback()) {
                return Err("plain http token endpoints are allowed only on loopback".into());
            }
            exchange(tcp, &request).await
        }
    };
    let (status, body) = tokio::time::timeout(req.timeout, work)
        .await
        .map_err(|_| format!("token endpoint {host} timed out"))??;
    if !(200..300).contains(&status) {
        let detail: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Err(format!(
            "token endpoint answered HTTP {status}: {}",
            detail.trim()
        ));
    }
    let token: Token =
        serde_json::from_slice(&body).map_err(|e| format!("bad token answer: {e}"))?;
    if token.access_token.is_empty() {
        return Err("token endpoint gave no access_token".into());
    }
    Ok(token)
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &str,
) -> Result<(u16, Vec<u8>), String> {
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    // Read until the answer is complete by its own framing (Content-Length
    // or chunks), not until the connection ends: a provider may keep it
    // open, or close it without a TLS close_notify.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let eof = match s.read(&mut buf).await {
            Ok(0) => true,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                false
            }
            // rustls reports a close without close_notify this way; what was
            // read is judged by its framing like at a clean end.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(e.to_string()),
        };
        if raw.len() > MAX_ANSWER {
            return Err(format!("token answer larger than {MAX_ANSWER} bytes"));
        }
        if let Answer::Complete(status, body) = parse_response(&raw, eof)? {
            return Ok((status, body));
        }
        if eof {
            return Err("truncated HTTP answer".into());
        }
    }
}

/// Token answers are small; anything bigger is refused.
const MAX_ANSWER: usize = 1 << 20;

/// Where reading an HTTP answer stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// More bytes are needed.
    Incomplete,
    /// Status and body.
    Complete(u16, Vec<u8>),
}

/// Parse an HTTP/1.1 answer read so far (`eof`: the connection ended). The
/// head is parsed by `httparse`; the body is framed by `Transfer-Encoding:
/// chunked`, else `Content-Length`, else the end of the connection.
pub fn parse_response(raw: &[u8], eof: bool) -> Result<Answer, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp
        .parse(raw)
        .map_err(|e| format!("bad HTTP answer: {e}"))?
    {
        httparse::Status::Partial if eof => return Err("truncated HTTP answer".into()),
        httparse::Status::Partial => return Ok(Answer::Incomplete),
        httparse::Status::Complete(n) => n,
    };
    let status = resp.code.ok_or("bad HTTP status line")?;
    if (100..200).contains(&status) {
        // An interim answer (100 Continue): the real one follows.
        return parse_response(&raw[head_len..], eof);
    }
    let header = |name: &str| -> Vec<String> {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
            .collect()
    };
    let chunked = header("transfer-encoding")
        .iter()
        .any(|v| v.contains("chunked"));
    let lengths = header("content-length");
    let body = &raw[head_len..];
    if chunked {
        return match dechunk(body)? {
            Some(b) => Ok(Answer::Complete(status, b)),
            None if eof => Err("truncated chunked answer".into()),
            None => Ok(Answer::Incomplete),
        };
    }
    if let Some(first) = lengths.first() {
        if lengths.iter().any(|l| l != first) {
            return Err("conflicting Content-Length headers".into());
        }
        let len: usize = first
            .parse()
            .map_err(|_| format!("bad Content-Length {first:?}"))?;
        if len > MAX_ANSWER {
            return Err(format!("token answer larger than {MAX_ANSWER} bytes"));
        }
        return if body.len() >= len {
            Ok(Answer::Complete(status, body[..len].to_vec()))
        } else if eof {
            Err(format!("truncated answer: {} of {len} bytes", body.len()))
        } else {
            Ok(Answer::Incomplete)
        };
    }
    // Neither: the body ends with the connection.
    Ok(if eof {
        Answer::Complete(status, body.to_vec())
    } else {
        Answer::Incomplete
    })
}

/// The body of a chunked transfer; `None` while incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&rest[..nl]);
        let size_txt = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16)
            .map_err(|_| format!("bad chunk size {size_txt:?}"))?;
        rest = &rest[nl + 2..];
        if size == 0 {
            // Trailers, if any, are of no use here.
            return Ok(Some(out));
        }
        if size > MAX_ANSWER || out.len() + size > MAX_ANSWER {
            return Err(format!("token answer larger than {MAX_ANSWER} bytes"));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// (tls, host, port, path) of `http(s)://host[:port]/path`.
pub fn parse_url(url: &str) -> Result<(bool, String, u16, String), String> {
    let (tls_on, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("token URL must start with https://, found {url:?}"));
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = crate::config::split_host_port(hostport, if tls_on { 443 } else { 80 })?;
    Ok((tls_on, host, port, path.to_string()))
}

fn form_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("https://oauth2.googleapis.com/token").unwrap(),
            (true, "oauth2.googleapis.com".into(), 443, "/token".into())
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8080").unwrap(),
            (false, "127.0.0.1".into(), 8080, "/".into())
        );
        assert!(parse_url("ftp://x").is_err());
    }

    fn complete(raw: &[u8], eof: bool) -> (u16, Vec<u8>) {
        match parse_response(raw, eof).unwrap() {
            Answer::Complete(s, b) => (s, b),
            Answer::Incomplete => panic!("incomplete: {}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn responses() {
        // Content-Length frames the body: complete before the connection ends.
        let sized = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        assert_eq!(complete(sized, false), (200, b"{\"a\":1}".to_vec()));
        assert_eq!(
            parse_response(&sized[..sized.len() - 2], false).unwrap(),
            Answer::Incomplete
        );
        assert!(parse_response(&sized[..sized.len() - 2], true).is_err());
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(complete(chunked, false), (200, b"{\"a\":1}".to_vec()));
        assert_eq!(
            parse_response(&chunked[..chunked.len() - 8], false).unwrap(),
            Answer::Incomplete
        );
        // Neither: the body ends with the connection.
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}";
        assert_eq!(parse_response(plain, false).unwrap(), Answer::Incomplete);
        assert_eq!(complete(plain, true), (200, b"{\"a\":1}".to_vec()));
        // An interim 100 Continue is skipped.
        let cont =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(complete(cont, false), (400, b"{}".to_vec()));
        assert!(parse_response(b"garbage\r\n\r\n", true).is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            false
        )
        .is_err());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            false
        )
        .is_err());
    }

    /// A provider that answers with a Content-Length and then neither
    /// closes nor sends anything: the answer is complete all the same.
    #[tokio::test]
    async fn an_answer_is_complete_without_the_connection_ending() {
        use tokio::io::AsyncWriteExt;
        let (client, mut server) = tokio::io::duplex(4096);
        let body = r#"{"access_token":"x","expires_in":60}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        server.write_all(answer.as_bytes()).await.unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            exchange(client, "POST / HTTP/1.1\r\n\r\n"),
        )
        .await
        .expect("answered without waiting for the end of the connection")
        .unwrap();
        assert_eq!(got, (200, body.as_bytes().to_vec()));
        drop(server);
    }

    fn token(json: &str) -> Result<Token, String> {
        serde_json::from_str::<Token>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn expires_in_as_number_or_string_and_absurd_values_refused() {
        let ok = |j: &str| token(j).unwrap().expires_in;
        assert_eq!(ok(r#"{"access_token":"a","expires_in":3600}"#), Some(3600));
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":"3599"}"#),
            Some(3599)
        );
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":3600.0}"#),
            Some(3600)
        );
        assert_eq!(ok(r#"{"access_token":"a","expires_in":null}"#), None);
        assert_eq!(ok(r#"{"access_token":"a"}"#), None);
        for (bad, why) in [
            (r#""expires_in":-1"#, "negative"),
            (r#""expires_in":"-60""#, "negative"),
            (r#""expires_in":9223372036854775807"#, "more than a year"),
            (r#""expires_in":1e300"#, "more than a year"),
            (r#""expires_in":31536001"#, "more than a year"),
            (r#""expires_in":"soon""#, "not a number"),
            (r#""expires_in":true"#, "not a number"),
            (r#""expires_in":1.5"#, "whole number"),
        ] {
            let e = token(&format!(r#"{{"access_token":"a",{bad}}}"#)).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn token_debug_hides_secrets() {
        let t = token(r#"{"access_token":"AT-SECRET","refresh_token":"RT-SECRET","expires_in":5}"#)
            .unwrap();
        let d = format!("{t:?}");
        assert!(!d.contains("SECRET"), "{d}");
        assert!(d.contains("expires_in: Some(5)"), "{d}");
    }

    #[test]
    fn escaping() {
        assert_eq!(form_escape("a b/c+d"), "a%20b%2Fc%2Bd");
    }
}
