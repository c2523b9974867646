//! The poller's side of the job subjects and idCache: `need_job` and cache
//! orders from any bytes, against a live schedule; and the worker's side:
//! a poller reply decoded and checked as a pulled sync job.
#![no_main]

use std::time::Duration;

use caliopen_imap::bus::wire::{ImapOrder, Job};
use caliopen_imap::poller::orders::{cache_order, need_job};
use caliopen_imap::poller::schedule::{Kind, Schedule};
use caliopen_imap::worker::orders;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the path, the rest is the payload.
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    let mut schedule = Schedule::new(Duration::from_secs(60), 16);
    let protocols = vec!["email".to_string(), "imap".to_string()];
    match which % 3 {
        0 => {
            let _ = cache_order(&mut schedule, &protocols, payload);
            // Whatever it scheduled is served as a well-formed job.
            schedule.release_due(tokio_now());
            let job = need_job(
                &mut schedule,
                Kind::Imap,
                br#"{"order":{"order":"need_job"}}"#,
            );
            assert!(!job.order.is_empty());
        }
        1 => {
            let job = need_job(&mut schedule, Kind::Imap, payload);
            assert!(!job.order.is_empty());
        }
        _ => {
            if let Ok(job) = serde_json::from_slice::<Job>(payload) {
                // As run_pulled does: a job is a sync order.
                let order = ImapOrder {
                    order: job.order,
                    user_id: job.user_id,
                    identity_id: job.identity_id,
                    ..Default::default()
                };
                if let Err(e) = orders::validate(&order) {
                    assert!(!e.contains('\n'), "{e:?}");
                }
            }
        }
    }
});

/// Later than anything `add_now` scheduled.
fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}
