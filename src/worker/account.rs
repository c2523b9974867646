//! Turn a stored identity (or a fullfetch order) into an IMAP [`Account`]:
//! server, security, credentials, trust settings.

use std::path::PathBuf;
use std::time::Duration;

use super::context::Ctx;
use crate::imap::{tls, Account, Auth, Security};
use crate::store::identity::{creds, infos, Identity};

/// Why an account cannot even be tried (bad stored data, missing password):
/// reported, but not counted as a login failure of the remote server.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AccountError(pub String);

pub fn from_identity(
    ctx: &Ctx,
    id: &Identity,
    password_override: &str,
) -> Result<Account, AccountError> {
    let server = id.info(infos::INSERVER).trim().to_string();
    if server.is_empty() {
        return Err(AccountError("identity has no inserver (host:port)".into()));
    }
    let auth = match id.info(infos::AUTHTYPE) {
        "" | infos::AUTH_LOGIN => {
            let user = id
                .credentials
                .get(creds::USERNAME_IN)
                .filter(|u| !u.is_empty())
                .cloned()
                .unwrap_or_else(|| id.identifier.clone());
            let password = if !password_override.is_empty() {
                password_override.to_string()
            } else {
                id.credentials
                    .get(creds::PASSWORD_IN)
                    .cloned()
                    .unwrap_or_default()
            };
            if password.is_empty() {
                return Err(AccountError(
                    "no password stored for this identity: give one to syncremote \
                     (--pass-env, --pass-file or --pass)"
                        .into(),
                ));
            }
            Auth::Login { user, password }
        }
        infos::AUTH_OAUTH2 => {
            let user = id
                .credentials
                .get(creds::USERNAME)
                .cloned()
                .unwrap_or_else(|| id.identifier.clone());
            let token = id
                .credentials
                .get(creds::ACCESS_TOKEN)
                .cloned()
                .unwrap_or_default();
            if token.is_empty() {
                return Err(AccountError("Oauth2 identity has no access token".into()));
            }
            Auth::XOAuth2 { user, token }
        }
        infos::AUTH_OAUTH1 => {
            return Err(AccountError(
                "authtype Oauth1 is not supported for IMAP".into(),
            ))
        }
        other => return Err(AccountError(format!("unknown authtype {other:?}"))),
    };
    let mut ca = Vec::new();
    let cafile = id.info(infos::CAFILE).trim();
    if !cafile.is_empty() {
        ca.push(PathBuf::from(cafile));
    }
    let pin = match id.info(infos::CERT_SHA256).trim() {
        "" => None,
        p => Some(tls::parse_pin(p).map_err(|e| AccountError(format!("cert_sha256: {e}")))?),
    };
    build(ctx, server, id.info(infos::SECURITY), auth, ca, pin)
}

/// A fullfetch order's account.
pub fn from_order(
    ctx: &Ctx,
    server: &str,
    login: &str,
    password: &str,
) -> Result<Account, AccountError> {
    if login.is_empty() {
        return Err(AccountError("fullfetch order has no login".into()));
    }
    if password.is_empty() {
        return Err(AccountError("fullfetch order has no password".into()));
    }
    let auth = Auth::Login {
        user: login.to_string(),
        password: password.to_string(),
    };
    build(ctx, server.trim().to_string(), "", auth, Vec::new(), None)
}

fn build(
    ctx: &Ctx,
    server: String,
    security: &str,
    auth: Auth,
    mut ca_files: Vec<PathBuf>,
    pin: Option<[u8; 32]>,
) -> Result<Account, AccountError> {
    let s = &ctx.settings.imap;
    let (_, port) = crate::config::split_host_port(&server, 993)
        .map_err(|e| AccountError(format!("inserver: {e}")))?;
    let security = Security::choose(security, port).map_err(AccountError)?;
    if !s.ca_file.is_empty() {
        ca_files.insert(0, PathBuf::from(&s.ca_file));
    }
    Ok(Account {
        server,
        security,
        auth,
        ca_files,
        pin,
        allow_plaintext_loopback: s.allow_plaintext_loopback,
        connect_timeout: Duration::from_secs(s.connect_timeout_secs),
        io_timeout: Duration::from_secs(s.io_timeout_secs),
    })
}
