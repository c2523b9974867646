//! What the poller answers: `need_job` on the job subjects, and the cache
//! orders on `idCache` (CONTRACT §2, replies included). Malformed input is
//! logged with its subject and answered as the contract says; it never
//! stops the poller.

use uuid::Uuid;

use super::schedule::{Interval, Kind, Schedule, DEFAULT_MINUTES};
use crate::bus::wire::{orders, CacheOrder, Job, NeedJob};

pub const ERR_UNMARSHAL: &str = "error : unable to unmarshal request";
pub const ERR_UNKNOWN: &str = "error : unknown order";

/// The poller's answer to a `need_job`, before it goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobReply {
    /// The oldest due sync of that kind.
    Job {
        user: Uuid,
        identity: Uuid,
    },
    NoPendingJob,
    /// The request was not JSON of a `need_job`.
    Unparsable,
    /// The request asked for something other than `need_job`.
    UnknownOrder,
}

impl JobReply {
    /// The JSON shape of the reply (CONTRACT §2).
    pub fn wire(&self) -> Job {
        match self {
            JobReply::Job { user, identity } => Job {
                message_id: String::new(),
                order: orders::SYNC.into(),
                identity_id: identity.to_string(),
                user_id: user.to_string(),
            },
            JobReply::NoPendingJob => only(orders::NO_PENDING_JOB),
            JobReply::Unparsable => only(ERR_UNMARSHAL),
            JobReply::UnknownOrder => only(ERR_UNKNOWN),
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, JobReply::Unparsable | JobReply::UnknownOrder)
    }

    /// The `result` label of `need_job_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            JobReply::Job { .. } => "served",
            JobReply::NoPendingJob => "empty",
            JobReply::Unparsable | JobReply::UnknownOrder => "error",
        }
    }
}

/// Answer a `need_job` request for `kind` with the oldest job, or
/// `no pending job`, or the contract's error.
pub fn answer_need_job(schedule: &mut Schedule, kind: Kind, payload: &[u8]) -> JobReply {
    let Ok(req) = serde_json::from_slice::<NeedJob>(payload) else {
        return JobReply::Unparsable;
    };
    if req.order.order != orders::NEED_JOB {
        return JobReply::UnknownOrder;
    }
    match schedule.pop_job(kind) {
        Some((user, identity)) => JobReply::Job { user, identity },
        None => JobReply::NoPendingJob,
    }
}

/// [`answer_need_job`] as it goes on the wire.
pub fn need_job(schedule: &mut Schedule, kind: Kind, payload: &[u8]) -> Job {
    answer_need_job(schedule, kind, payload).wire()
}

fn only(order: &str) -> Job {
    Job {
        order: order.to_string(),
        ..Default::default()
    }
}

/// `order_param` of add/update_interval: 0 < n < 4320, else 15.
pub fn interval_param(p: &str) -> Interval {
    match p.trim().parse::<i64>() {
        Ok(n) if n > 0 && n < 4320 => Interval::Minutes(n as u32),
        _ => Interval::Minutes(DEFAULT_MINUTES),
    }
}

/// An `idCache` order, read once into what it asks of the schedule.
#[derive(Debug, PartialEq)]
pub enum CacheCommand {
    /// `add`: schedule the identity now, then every `interval`.
    Add {
        key: (Uuid, Uuid),
        kind: Kind,
        interval: Interval,
    },
    /// `delete`: unschedule it.
    Delete { key: (Uuid, Uuid) },
    /// `update_interval`: reschedule a scheduled identity.
    UpdateInterval {
        key: (Uuid, Uuid),
        interval: Interval,
    },
}

impl CacheCommand {
    /// Read an `idCache` payload; `Err` names what was wrong, for the log.
    pub fn parse(protocols: &[String], payload: &[u8]) -> Result<CacheCommand, String> {
        let o: CacheOrder = serde_json::from_slice(payload)
            .map_err(|e| format!("unable to unmarshal order: {e}"))?;
        let user = Uuid::parse_str(o.user_id.trim())
            .map_err(|_| format!("user_id is not a UUID: {:?}", o.user_id))?;
        let identity = Uuid::parse_str(o.identity_id.trim())
            .map_err(|_| format!("identity_id is not a UUID: {:?}", o.identity_id))?;
        let key = (user, identity);
        match o.order.as_str() {
            orders::CACHE_ADD => {
                let protocol = if o.protocol.is_empty() {
                    "email"
                } else {
                    o.protocol.as_str()
                };
                if !protocols.iter().any(|p| p == protocol) {
                    return Err(format!("protocol {protocol:?} is not in remote_protocols"));
                }
                let kind = Kind::of_protocol(protocol)
                    .ok_or_else(|| format!("unknown protocol {protocol:?}"))?;
                Ok(CacheCommand::Add {
                    key,
                    kind,
                    interval: interval_param(&o.order_param),
                })
            }
            orders::CACHE_DELETE => Ok(CacheCommand::Delete { key }),
            orders::CACHE_UPDATE_INTERVAL => Ok(CacheCommand::UpdateInterval {
                key,
                interval: interval_param(&o.order_param),
            }),
            other => Err(format!("unknown order {other:?}")),
        }
    }

    /// Apply it; `Ok` says what was done, `Err` why nothing was.
    pub fn apply(self, schedule: &mut Schedule) -> Result<String, String> {
        match self {
            CacheCommand::Add {
                key,
                kind,
                interval,
            } => {
                schedule.add_now(key, kind, interval);
                Ok(format!("scheduled {}", key.1))
            }
            CacheCommand::Delete { key } => {
                schedule.remove(&key);
                Ok(format!("unscheduled {}", key.1))
            }
            CacheCommand::UpdateInterval { key, interval } => {
                if schedule.reschedule(key, interval) {
                    Ok(format!("rescheduled {}", key.1))
                } else {
                    Err(format!(
                        "update_interval for unscheduled identity {}",
                        key.1
                    ))
                }
            }
        }
    }
}

/// Apply an `idCache` order. `Err` names what was wrong, for the log.
pub fn cache_order(
    schedule: &mut Schedule,
    protocols: &[String],
    payload: &[u8],
) -> Result<String, String> {
    CacheCommand::parse(protocols, payload)?.apply(schedule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sched() -> Schedule {
        Schedule::new(Duration::from_secs(60), 100)
    }

    #[tokio::test(start_paused = true)]
    async fn need_job_replies() {
        let mut s = sched();
        let ok = br#"{"worker":"w","order":{"order":"need_job"}}"#;
        assert_eq!(
            need_job(&mut s, Kind::Imap, ok).order,
            orders::NO_PENDING_JOB
        );
        assert_eq!(need_job(&mut s, Kind::Imap, b"{").order, ERR_UNMARSHAL);
        let bad = br#"{"worker":"w","order":{"order":"dance"}}"#;
        assert_eq!(need_job(&mut s, Kind::Imap, bad).order, ERR_UNKNOWN);
        let typed = answer_need_job(&mut s, Kind::Imap, bad);
        assert!(typed.is_error() && typed.outcome() == "error");
        assert!(answer_need_job(&mut s, Kind::Imap, b"{").is_error());
        assert_eq!(answer_need_job(&mut s, Kind::Imap, ok).outcome(), "empty");

        let add = br#"{"identity_id":"00000000-0000-0000-0000-000000000002","order":"add","order_param":"5","protocol":"email","user_id":"00000000-0000-0000-0000-000000000001"}"#;
        let protos = vec!["email".to_string()];
        cache_order(&mut s, &protos, add).unwrap();
        s.release_due(tokio::time::Instant::now());
        let job = need_job(&mut s, Kind::Imap, ok);
        assert_eq!(job.order, "sync");
        assert_eq!(job.identity_id, "00000000-0000-0000-0000-000000000002");
        assert_eq!(
            serde_json::to_string(&job).unwrap(),
            r#"{"message_id":"","order":"sync","identity_id":"00000000-0000-0000-0000-000000000002","user_id":"00000000-0000-0000-0000-000000000001"}"#
        );
    }

    #[test]
    fn interval_params() {
        assert_eq!(interval_param("30"), Interval::Minutes(30));
        assert_eq!(interval_param("0"), Interval::Minutes(15));
        assert_eq!(interval_param("4320"), Interval::Minutes(15));
        assert_eq!(interval_param("x"), Interval::Minutes(15));
    }

    #[test]
    fn cache_order_errors() {
        let mut s = sched();
        let p = vec!["email".to_string()];
        assert!(cache_order(&mut s, &p, b"nope").is_err());
        assert!(cache_order(
            &mut s,
            &p,
            br#"{"order":"add","user_id":"x","identity_id":"y"}"#
        )
        .is_err());
        let tw = br#"{"identity_id":"00000000-0000-0000-0000-000000000002","order":"add","protocol":"twitter","user_id":"00000000-0000-0000-0000-000000000001"}"#;
        assert!(
            cache_order(&mut s, &p, tw).is_err(),
            "twitter not in protocols"
        );
        let unknown = br#"{"identity_id":"00000000-0000-0000-0000-000000000002","order":"dance","user_id":"00000000-0000-0000-0000-000000000001"}"#;
        assert_eq!(
            CacheCommand::parse(&p, unknown).unwrap_err(),
            r#"unknown order "dance""#
        );
        let upd = br#"{"identity_id":"00000000-0000-0000-0000-000000000002","order":"update_interval","order_param":"30","user_id":"00000000-0000-0000-0000-000000000001"}"#;
        assert!(matches!(
            CacheCommand::parse(&p, upd),
            Ok(CacheCommand::UpdateInterval {
                interval: Interval::Minutes(30),
                ..
            })
        ));
    }
}
