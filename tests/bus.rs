//! The NATS bus against the real server.

use std::time::Duration;

use caliopen_imap::bus::wire::{Job, NeedJob, OrderName};
use caliopen_imap::bus::{Bus, BusError, Retry};
use caliopen_imap::shutdown::Shutdown;
use futures::StreamExt;

use crate::util::{bus, stack, unique};

#[tokio::test]
async fn request_reply_round_trip() {
    let b = bus().await;
    let subject = unique("rr.");
    let mut sub = b.queue_subscribe(&subject, "testers").await.unwrap();
    b.flush().await.unwrap();
    let responder = b.clone();
    tokio::spawn(async move {
        let msg = sub.next().await.unwrap();
        let req: NeedJob = serde_json::from_slice(&msg.payload).unwrap();
        let job = Job {
            order: "sync".into(),
            user_id: req.worker.clone(),
            ..Default::default()
        };
        responder.reply(&msg, &job).await;
    });
    let req = NeedJob {
        worker: "w-42".into(),
        order: OrderName {
            order: "need_job".into(),
        },
    };
    let job: Job = b
        .request(&subject, &req, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(job.order, "sync");
    assert_eq!(job.user_id, "w-42");
}

#[tokio::test]
async fn no_responder_is_told_apart() {
    let b = bus().await;
    let err = b
        .request::<_, Job>(
            &unique("nobody."),
            &OrderName::default(),
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::NoResponders(_)), "{err}");
}

#[tokio::test]
async fn unreachable_nats_is_one_clear_line() {
    let err = Bus::connect(
        "nats://127.0.0.1:1",
        "t",
        Retry::Attempts(1),
        Shutdown::never(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("cannot reach NATS at nats://127.0.0.1:1"),
        "{err}"
    );
    let _ = stack();
}

/// `nats_url` may list the servers of a cluster: a daemon started while one
/// of them is down still connects, through another.
#[tokio::test]
async fn a_server_list_connects_through_a_live_server_when_one_is_down() {
    let url = format!("nats://127.0.0.1:1,{}", stack().nats_url);
    let b = Bus::connect(&url, "t", Retry::Attempts(1), Shutdown::never())
        .await
        .unwrap();
    let err = b
        .request::<_, Job>(
            &unique("nobody."),
            &OrderName::default(),
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::NoResponders(_)), "{err}");
}
