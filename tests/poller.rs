//! idpoller against NATS and Cassandra: scans, cache orders, FIFO job
//! queues, and a leader/standby pair surviving the leader's death.
//!
//! Poller tests schedule `mastodon` identities only (no other test creates
//! any), with one-second "minutes" (`poller.minute_secs: 1`). Pollers of
//! different tests share the table, so assertions look at this test's own
//! identities and their relative order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caliopen_imap::bus::wire::{CacheOrder, Job, NeedJob, OrderName};
use caliopen_imap::bus::{Bus, BusError};
use caliopen_imap::store::identity::Identity;
use caliopen_imap::store::Store;
use uuid::Uuid;

use crate::util::*;

pub fn poller_yaml(tag: &str, lease: &str) -> PathBuf {
    let s = stack();
    let text = format!(
        "scan_interval: 2\nremote_protocols: [mastodon]\nstore_settings:\n  hosts: [\"{}\"]\n\
         nats_url: {}\nnats_topics:\n  id_cache: idCache.{tag}\n  imap: imapJobs.{tag}\n  \
         twitter: twitterJobs.{tag}\n  mastodon: mastodonJobs.{tag}\n\
         poller:\n  minute_secs: 1\n  lease_ttl_secs: 3\n  lease_name: {lease}\n",
        s.cassandra, s.nats_url
    );
    let path = std::env::temp_dir().join(format!("idpoller-{tag}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

struct Poller(Child);

impl Poller {
    fn start(cfg: &std::path::Path) -> Poller {
        let child = Command::new(bin())
            .args(["poller", "-c", cfg.to_str().unwrap(), "start"])
            .env("CALIOPEN_IMAP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Poller(child)
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        self.0.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An active mastodon identity, never checked, polled every `interval` "minutes".
async fn mastodon_identity(st: &Store, user: Uuid, interval: &str) -> Identity {
    let id = Identity {
        user_id: user,
        identity_id: Uuid::new_v4(),
        identifier: unique("m"),
        infos: HashMap::from([("pollinterval".to_string(), interval.to_string())]),
        protocol: "mastodon".into(),
        status: "active".into(),
        kind: "remote".into(),
        ..Default::default()
    };
    st.insert_identity(&id).await.unwrap();
    id
}

async fn need_job(b: &Bus, tag: &str) -> Result<Job, BusError> {
    let req = NeedJob {
        worker: "test".into(),
        order: OrderName {
            order: "need_job".into(),
        },
    };
    b.request(&format!("mastodonJobs.{tag}"), &req, Duration::from_secs(2))
        .await
}

/// Pull jobs until "no pending job" (at most `max`); the identity ids served.
async fn drain(b: &Bus, tag: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..max {
        match need_job(b, tag).await {
            Ok(j) if j.order == "sync" => out.push(j.identity_id),
            Ok(j) => {
                assert_eq!(j.order, "no pending job");
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    out
}

async fn cache(b: &Bus, tag: &str, order: &str, id: &Identity, param: &str) {
    let o = CacheOrder {
        identity_id: id.identity_id.to_string(),
        order: order.into(),
        order_param: param.into(),
        protocol: "mastodon".into(),
        user_id: id.user_id.to_string(),
    };
    b.publish(&format!("idCache.{tag}"), &o).await.unwrap();
    b.flush().await.unwrap();
}

/// Wait until the poller answers need_job at all.
async fn wait_serving(b: &Bus, tag: &str) {
    let start = Instant::now();
    while need_job(b, tag).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "poller never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_cache_orders_and_fifo_queues() {
    let tag = unique("p1");
    let st = store().await;
    let b = bus().await;
    let (user, _) = new_user(&st).await;
    let mut poller = Poller::start(&poller_yaml(&tag, &unique("lease")));
    wait_serving(&b, &tag).await;

    // Malformed requests get the contract's answers.
    let bad = b
        .request_raw(
            &format!("mastodonJobs.{tag}"),
            "{oops".into(),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    assert_eq!(
        text(&bad.payload),
        r#"{"message_id":"","order":"error : unable to unmarshal request","identity_id":"","user_id":""}"#
    );
    let odd: Job = b
        .request(
            &format!("mastodonJobs.{tag}"),
            &NeedJob {
                worker: "t".into(),
                order: OrderName {
                    order: "dance".into(),
                },
            },
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    assert_eq!(odd.order, "error : unknown order");
    b.publish_bytes(&format!("idCache.{tag}"), "not json".into())
        .await
        .unwrap();

    // Added through the database: picked up by the next scan (2 s here).
    let by_db = mastodon_identity(&st, user, "3600").await;
    let start = Instant::now();
    let mut seen = Vec::new();
    while !seen.contains(&by_db.identity_id.to_string()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "scan never picked it up"
        );
        seen.extend(drain(&b, &tag, 1000).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Added through idCache: scheduled at once, served FIFO, no duplicates.
    let a = mastodon_identity(&st, user, "3600").await;
    let c = mastodon_identity(&st, user, "3600").await;
    let d = mastodon_identity(&st, user, "3600").await;
    drain(&b, &tag, 1000).await; // whatever the last scan queued
    for id in [&a, &c, &d] {
        cache(&b, &tag, "add", id, "3600").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cache(&b, &tag, "add", &a, "3600").await; // again: still one job
    tokio::time::sleep(Duration::from_millis(300)).await;
    let served = drain(&b, &tag, 1000).await;
    let ours: Vec<&String> = served
        .iter()
        .filter(|s| {
            [&a, &c, &d]
                .iter()
                .any(|i| i.identity_id.to_string() == **s)
        })
        .collect();
    let expect: Vec<String> = [&a, &c, &d]
        .iter()
        .map(|i| i.identity_id.to_string())
        .collect();
    assert_eq!(ours, expect.iter().collect::<Vec<_>>(), "FIFO, once each");
    assert_eq!(need_job(&b, &tag).await.unwrap().order, "no pending job");

    // update_interval: a 1-second period, then back to an hour.
    cache(&b, &tag, "update_interval", &a, "1").await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let served = drain(&b, &tag, 1000).await;
    assert!(
        served.contains(&a.identity_id.to_string()),
        "1 s interval not applied"
    );
    cache(&b, &tag, "update_interval", &a, "3600").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain(&b, &tag, 1000).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!drain(&b, &tag, 1000)
        .await
        .contains(&a.identity_id.to_string()));

    // delete: gone from the schedule (Caliopen deactivates it in the DB too).
    cache(&b, &tag, "update_interval", &c, "1").await;
    st.set_status(user, c.identity_id, "inactive")
        .await
        .unwrap();
    cache(&b, &tag, "delete", &c, "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain(&b, &tag, 1000).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!drain(&b, &tag, 1000)
        .await
        .contains(&c.identity_id.to_string()));

    // SIGTERM: a clean exit.
    assert_eq!(poller.terminate(), Some(0));
    for id in [&by_db, &a, &c, &d] {
        st.set_status(user, id.identity_id, "inactive")
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leader_dies() {
    let tag = unique("p2");
    let lease = unique("lease");
    let cfg = poller_yaml(&tag, &lease);
    let st = store().await;
    let b = bus().await;
    let (user, _) = new_user(&st).await;

    let mut leader = Poller::start(&cfg);
    wait_serving(&b, &tag).await;
    let _standby = Poller::start(&cfg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drain(&b, &tag, 1000).await;

    leader.kill();
    let killed = Instant::now();
    // A new identity, never synced: due at once when the standby rebuilds.
    let id = mastodon_identity(&st, user, "3600").await;
    let mut served: HashMap<String, usize> = HashMap::new();
    loop {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no job within 30 s of the leader's death"
        );
        for s in drain(&b, &tag, 1000).await {
            *served.entry(s).or_default() += 1;
        }
        if served.contains_key(&id.identity_id.to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served[&id.identity_id.to_string()], 1, "served once");
    st.set_status(user, id.identity_id, "inactive")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_configuration() {
    let tag = unique("p3");
    let cfg = poller_yaml(&tag, &unique("lease"));
    let b = bus().await;
    let poller = Poller::start(&cfg);
    wait_serving(&b, &tag).await;

    // Move the job subjects to another name and say SIGHUP.
    let moved = format!("{tag}moved");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("Jobs.{tag}"), &format!("Jobs.{moved}"));
    std::fs::write(&cfg, text).unwrap();
    Command::new("kill")
        .args(["-HUP", &poller.0.id().to_string()])
        .status()
        .unwrap();
    wait_serving(&b, &moved).await;
    assert!(
        need_job(&b, &tag).await.is_err(),
        "old subject no longer served"
    );

    // A broken file is refused and the running configuration kept.
    std::fs::write(&cfg, "scan_interval: [\n").unwrap();
    Command::new("kill")
        .args(["-HUP", &poller.0.id().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        need_job(&b, &moved).await.is_ok(),
        "still serving after a bad reload"
    );
}
