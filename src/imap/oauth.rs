//! Refreshing an OAuth2 access token (XOAUTH2 accounts such as Gmail).
//!
//! One form POST to the provider's token endpoint, with the refresh token
//! and the client credentials from `LDAConfig.Providers`. It takes a
//! minimal HTTP/1.1 client over the same verified TLS as IMAP: one request,
//! `Connection: close`, a JSON answer. That is all a token refresh needs,
//! and it spares us a full HTTP stack. Plain `http://` is accepted only for
//! loopback addresses with `imap.allow_plaintext_loopback` (tests).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tls;

/// Google's token endpoint, used for provider `gmail` when none is configured.
pub const GMAIL_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";

/// What the endpoint gave back.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Token {
    pub access_token: String,
    #[serde(default)]
    pub token_type: String,
    #[serde(default)]
    pub expires_in: Option<i64>,
    /// Some providers rotate the refresh token.
    #[serde(default)]
    pub refresh_token: Option<String>,
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
    let mut raw = Vec::new();
    // Token answers are small; refuse anything absurd.
    s.take(1 << 20)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    parse_response(&raw)
}

/// Status and body of an HTTP/1.1 response (plain or chunked body).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("truncated HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("bad HTTP status line")?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[end + 4..];
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let nl = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunked body")?;
        let size_txt = String::from_utf8_lossy(&rest[..nl]);
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        rest = &rest[nl + 2..];
        if size == 0 {
            break;
        }
        if rest.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
    Ok((status, out))
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

    #[test]
    fn responses() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{\"a\":1}".to_vec()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (200, b"{\"a\":1}".to_vec())
        );
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn escaping() {
        assert_eq!(form_escape("a b/c+d"), "a%20b%2Fc%2Bd");
    }
}
