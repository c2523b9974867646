//! `addremote`: create a remote email identity exactly as Caliopen does
//! (identity row, credentials, default infos, both lookup rows, identifier
//! lower-cased), then tell the poller so it is scheduled at once.

use std::collections::HashMap;
use std::process::ExitCode;

use uuid::Uuid;

use super::common;
use crate::bus::wire::{orders, CacheOrder};
use crate::cli::AddRemoteArgs;
use crate::config::WorkerSettings;
use crate::error;
use crate::store::identity::{
    creds, infos, Identity, IdentityKind, Protocol, Status, PROTOCOL_EMAIL,
};

/// `--pollinterval`: minutes (1 to 4319, the poller's bounds) or a cron
/// expression (5 fields, or 6-7 with seconds/years, firing at most once a
/// minute).
pub fn poll_interval(v: &str) -> anyhow::Result<String> {
    let v = v.trim();
    if let Ok(n) = v.parse::<i64>() {
        if (1..4320).contains(&n) {
            return Ok(n.to_string());
        }
        return Err(error::usage(format!(
            "--pollinterval: expected 1 to 4319 minutes, found {n}"
        )));
    }
    crate::poller::schedule::parse_cron(v).map_err(|e| {
        error::usage(format!(
            "--pollinterval: neither 1 to 4319 minutes nor an accepted cron expression: {e}"
        ))
    })?;
    Ok(v.to_string())
}

pub async fn run(a: AddRemoteArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let login = a.login.trim().to_string();
    if login.is_empty() {
        return Err(error::usage("--login: must not be empty"));
    }
    let server = common::server(&a.server)?;
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let pollinterval = match &a.pollinterval {
        Some(p) => poll_interval(p)?,
        None => "15".to_string(),
    };
    let password = password(&a, &login)?;
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    if let Some(existing) = store.lookup_identity(user_id, &login).await? {
        return Err(error::conflict(format!(
            "user {user_id} already has a remote identity for {login:?} ({existing})"
        )));
    }
    let bus = common::bus(s).await?;

    let identity = new_identity(&a, user_id, &login, &server, &pollinterval, password);
    store.insert_identity(&identity).await?;

    let order = CacheOrder {
        identity_id: identity.identity_id.to_string(),
        order: orders::CACHE_ADD.into(),
        order_param: if pollinterval.parse::<u32>().is_ok() {
            pollinterval
        } else {
            String::new()
        },
        protocol: PROTOCOL_EMAIL.into(),
        user_id: user_id.to_string(),
    };
    bus.publish(&s.nats_topic_poller_cache, &order).await?;
    bus.flush().await?;
    println!("{}", identity.identity_id);
    Ok(ExitCode::SUCCESS)
}

/// The password to store: none with `--no-pass`, else from the flags or a
/// prompt.
fn password(a: &AddRemoteArgs, login: &str) -> anyhow::Result<Option<String>> {
    if a.no_pass {
        if a.pass.is_some() || a.pass_env.is_some() || a.pass_file.is_some() {
            return Err(error::usage(
                "--no-pass and a password flag contradict each other",
            ));
        }
        return Ok(None);
    }
    let question = format!("IMAP password for {login} (empty: do not store one): ");
    common::password(&a.pass, &a.pass_env, &a.pass_file, Some(&question))
}

/// The `user_identity` row Caliopen writes for a new remote email identity.
fn new_identity(
    a: &AddRemoteArgs,
    user_id: Uuid,
    login: &str,
    server: &str,
    pollinterval: &str,
    password: Option<String>,
) -> Identity {
    let mut info = HashMap::from([
        (infos::INSERVER.to_string(), server.to_string()),
        (infos::AUTHTYPE.to_string(), infos::AUTH_LOGIN.to_string()),
        (infos::POLLINTERVAL.to_string(), pollinterval.to_string()),
    ]);
    if let Some(m) = a
        .mailbox
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        info.insert(infos::MAILBOXES.to_string(), m.to_string());
    }
    if a.idle {
        info.insert(infos::IDLE.to_string(), "true".to_string());
    }
    let mut credentials = HashMap::from([(creds::USERNAME_IN.to_string(), login.to_string())]);
    if let Some(p) = password {
        credentials.insert(creds::PASSWORD_IN.to_string(), p);
    }
    Identity {
        user_id,
        identity_id: Uuid::new_v4(),
        credentials,
        display_name: a
            .display
            .clone()
            .filter(|d| !d.trim().is_empty())
            .unwrap_or_else(|| login.to_string()),
        identifier: login.to_lowercase(),
        infos: info,
        last_check: None,
        protocol: Protocol::Email,
        status: Status::Active,
        kind: IdentityKind::Remote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_opts_the_identity_in_to_live_sync() {
        use argh::FromArgs;
        let base = ["--login", "a@b.test", "--server", "imap.b.test:993"];
        for (extra, want) in [(None, ""), (Some("--idle"), "true")] {
            let args: Vec<&str> = base.iter().copied().chain(extra).collect();
            let a = AddRemoteArgs::from_args(&["addremote"], &args).unwrap();
            let id = new_identity(&a, Uuid::nil(), "a@b.test", "imap.b.test:993", "15", None);
            assert_eq!(id.info(infos::IDLE), want);
        }
    }

    #[test]
    fn poll_intervals() {
        assert_eq!(poll_interval(" 30 ").unwrap(), "30");
        assert_eq!(poll_interval("0 7 * * 1-5").unwrap(), "0 7 * * 1-5");
        assert_eq!(poll_interval("15 */5 * * * *").unwrap(), "15 */5 * * * *");
        for bad in ["0", "4320", "banana"] {
            assert!(poll_interval(bad).is_err(), "{bad}");
        }
        // One login a second is refused, with the reason.
        for fast in ["* * * * * *", "*/5 * * * * *"] {
            let e = poll_interval(fast).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), crate::error::code::USAGE);
            assert!(e.to_string().contains("more than once a minute"), "{e}");
        }
    }
}
