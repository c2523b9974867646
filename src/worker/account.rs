//! Turn a stored identity (or a fullfetch order) into an IMAP [`Account`]:
//! server, security, credentials, trust settings.

use std::path::PathBuf;

use super::context::Ctx;
use crate::imap::{tls, Account, Auth, Security};
use std::collections::HashMap;

use chrono::Utc;

use crate::store::identity::{creds, infos, parse_time, time_text, Identity};

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
        connect_timeout: s.connect_timeout(),
        io_timeout: s.io_timeout(),
    })
}

/// For an `Oauth2` identity whose access token has expired (or will within a
/// minute), get a new one from the provider and store it (CONTRACT §3 keys),
/// so the login that follows uses it.
pub async fn ensure_fresh_token(ctx: &Ctx, id: &mut Identity) -> Result<(), AccountError> {
    if !token_expired(id) {
        return Ok(());
    }
    let refresh_token = id
        .credentials
        .get(creds::REFRESH_TOKEN)
        .filter(|t| !t.is_empty())
        .cloned()
        .ok_or_else(|| {
            AccountError("Oauth2 access token expired and no refresh token is stored".into())
        })?;
    let provider_name = id.info(infos::PROVIDER).to_string();
    let provider = ctx
        .settings
        .lda
        .providers
        .iter()
        .find(|p| p.name == provider_name)
        .ok_or_else(|| {
            AccountError(format!(
                "Oauth2 token expired and provider {provider_name:?} is not in LDAConfig.Providers"
            ))
        })?;
    let get = |k: &str| provider.infos.get(k).map(String::as_str).unwrap_or("");
    let token_url = match get("token_url") {
        "" if provider_name == "gmail" => crate::imap::oauth::GMAIL_TOKEN_URL,
        "" => {
            return Err(AccountError(format!(
                "provider {provider_name:?} has no token_url to refresh tokens with"
            )))
        }
        u => u,
    };
    let s = &ctx.settings.imap;
    let ca: Vec<&std::path::Path> = if s.ca_file.is_empty() {
        Vec::new()
    } else {
        vec![std::path::Path::new(&s.ca_file)]
    };
    let req = crate::imap::oauth::RefreshRequest {
        token_url,
        client_id: get("client_id"),
        client_secret: get("client_secret"),
        refresh_token: &refresh_token,
        ca_files: &ca,
        allow_plaintext_loopback: s.allow_plaintext_loopback,
        timeout: s.connect_timeout(),
    };
    // Boxed: an HTTPS exchange's state (~10 KiB) would otherwise sit in
    // the future of every caller, every held IDLE session among them.
    let token = Box::pin(crate::imap::oauth::refresh(&req))
        .await
        .map_err(|e| AccountError(format!("cannot refresh the Oauth2 token: {e}")))?;
    store_token(ctx, id, token).await?;
    tracing::info!(identity = %id.identity_id, provider = %provider_name, "Oauth2 token refreshed");
    Ok(())
}

/// An `Oauth2` identity whose token expires within a minute. No known
/// expiry: the token is tried as it is.
fn token_expired(id: &Identity) -> bool {
    if id.info(infos::AUTHTYPE) != infos::AUTH_OAUTH2 {
        return false;
    }
    let expiry = id
        .credentials
        .get(creds::TOKEN_EXPIRY)
        .and_then(|e| parse_time(e));
    expiry.is_some_and(|e| e <= Utc::now() + chrono::Duration::seconds(60))
}

/// Store a refreshed token in the identity's credentials, and keep it in
/// `id` for the login that follows.
async fn store_token(
    ctx: &Ctx,
    id: &mut Identity,
    token: crate::imap::oauth::Token,
) -> Result<(), AccountError> {
    // `expires_in` is at most a year (checked when parsed), so this cannot
    // overflow.
    let expires =
        Utc::now() + chrono::Duration::seconds(i64::from(token.expires_in.unwrap_or(3600)));
    let mut entries = HashMap::from([
        (creds::ACCESS_TOKEN.to_string(), token.access_token.clone()),
        (creds::TOKEN_EXPIRY.to_string(), time_text(expires)),
    ]);
    if !token.token_type.is_empty() {
        entries.insert(creds::TOKEN_TYPE.to_string(), token.token_type.clone());
    }
    if let Some(rt) = token.refresh_token.filter(|t| !t.is_empty()) {
        entries.insert(creds::REFRESH_TOKEN.to_string(), rt);
    }
    ctx.store
        .merge_credentials(id.user_id, id.identity_id, entries.clone())
        .await
        .map_err(|e| AccountError(format!("cannot store the refreshed token: {e}")))?;
    id.credentials.extend(entries);
    Ok(())
}
