//! `fullfetch`: order a stateless fetch of a whole mailbox; `--wait` follows it.

use std::process::ExitCode;

use super::common;
use crate::bus::wire::{orders, ImapOrder};
use crate::cli::FullFetchArgs;
use crate::config::WorkerSettings;
use crate::error;

pub async fn run(a: FullFetchArgs, s: &WorkerSettings) -> anyhow::Result<ExitCode> {
    let login = a.login.trim().to_string();
    if login.is_empty() {
        return Err(error::usage("--login: must not be empty"));
    }
    let server = common::server(&a.server)?;
    let user = common::UserRef::parse(&a.userid, &a.username)?;
    let prompt = format!("IMAP password for {login}: ");
    let password = common::password(&a.pass, &a.pass_env, &a.pass_file, Some(&prompt))?
        .ok_or_else(|| error::usage("missing password: give --pass-env, --pass-file or --pass"))?;
    let store = common::store(s).await?;
    let user_id = user.resolve(&store).await?;
    let bus = common::bus(s).await?;
    let mailbox = if a.mailbox.trim().is_empty() {
        "INBOX".to_string()
    } else {
        a.mailbox.clone()
    };
    let order = ImapOrder {
        order: orders::FULLFETCH.into(),
        user_id: user_id.to_string(),
        login: login.clone(),
        mailbox: mailbox.clone(),
        password,
        server,
        ..Default::default()
    };
    let what = format!("fullfetch of {login} {mailbox}");
    common::send_order(s, &bus, &order, a.wait, a.timeout, &what).await
}
