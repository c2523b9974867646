//! A stand-in for Caliopen's message processor (the "LDA"), which is not
//! part of this project: it answers `process_raw` requests on the hand-off
//! subject the way Caliopen's processor does, so the demo and the
//! benchmarks can run without the rest of Caliopen.
//!
//! `cargo run --example lda_standin -- [NATS_URL] [SUBJECT]`
//! (defaults: nats://127.0.0.1:14222, inboundSMTP). Set `LDA_FAIL_EVERY=n`
//! to fail every n-th request (fault testing).

#[path = "../tests/support/processor.rs"]
mod processor;

use std::time::Duration;

use processor::{Answer, Pace};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:14222".into());
    let subject = args.next().unwrap_or_else(|| "inboundSMTP".into());
    let fail_every: u64 = std::env::var("LDA_FAIL_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let client = async_nats::connect(&url).await?;
    let sub = client
        .queue_subscribe(subject.clone(), "SMTPqueue".into())
        .await?;
    client.flush().await?;
    eprintln!("lda stand-in: answering process_raw on {subject} ({url})");
    let mut n = 0u64;
    processor::serve(client, sub, move |_| {
        n += 1;
        let answer = if fail_every > 0 && n.is_multiple_of(fail_every) {
            Answer::Fail
        } else {
            Answer::Ok
        };
        (answer, Pace::Serial(Duration::ZERO))
    })
    .await;
    Ok(())
}
