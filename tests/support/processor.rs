//! The processor stand-in: answers the `process_raw` hand-off the way
//! Caliopen's message processor (outside this project) does, for the
//! integration tests, the demo, the benchmarks and the fault suite.
//!
//! One module, so the request and reply shapes of the contract are written
//! once; the tests use it as `util::processor`, the examples include it by
//! path. Callers decide how each request is answered (success, failure,
//! silence, and how late) and may record what they see on the way.

#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

/// A `process_raw` order as the worker sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessRaw {
    pub user_id: Uuid,
    pub message_id: Uuid,
}

impl ProcessRaw {
    /// The order in `payload`, when it is a well-formed `process_raw`.
    pub fn parse(payload: &[u8]) -> Option<ProcessRaw> {
        let v: Value = serde_json::from_slice(payload).ok()?;
        if v["order"] != "process_raw" {
            return None;
        }
        Some(ProcessRaw {
            user_id: v["user_id"].as_str()?.parse().ok()?,
            message_id: v["message_id"].as_str()?.parse().ok()?,
        })
    }
}

/// How the stand-in answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Success, with the ids of the message and discussion made of it.
    Ok,
    /// `{"error": ...}`, as the processor rejects a message.
    Fail,
    /// No answer at all (the worker's hand-off times out).
    Silent,
}

/// When the stand-in answers: at once, after a pause that holds the next
/// answers too (one processor working through a queue), or after a pause
/// of each request's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Serial(Duration),
    Each(Duration),
}

/// The reply to `answer`; `None` for silence.
pub fn reply_of(answer: Answer) -> Option<Vec<u8>> {
    let body = match answer {
        Answer::Ok => json!({
            "message": "OK : raw message processed",
            "message_id": Uuid::new_v4().to_string(),
            "discussion_id": Uuid::new_v4().to_string(),
        }),
        Answer::Fail => json!({"error": "stand-in: chosen failure"}),
        Answer::Silent => return None,
    };
    Some(body.to_string().into_bytes())
}

/// Answer every request on `sub` until it ends. `decide` picks the answer
/// of each well-formed `process_raw` and its pause; anything else gets the
/// processor's `unknown order` error at once.
pub async fn serve<F>(client: async_nats::Client, mut sub: async_nats::Subscriber, mut decide: F)
where
    F: FnMut(&ProcessRaw) -> (Answer, Pace) + Send,
{
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply else { continue };
        let (body, pace) = match ProcessRaw::parse(&msg.payload) {
            Some(order) => {
                let (answer, pace) = decide(&order);
                (reply_of(answer), pace)
            }
            None => (
                Some(json!({"error": "unknown order"}).to_string().into_bytes()),
                Pace::Serial(Duration::ZERO),
            ),
        };
        let Some(body) = body else { continue };
        match pace {
            Pace::Serial(pause) => {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let _ = client.publish(reply, body.into()).await;
            }
            Pace::Each(pause) if pause.is_zero() => {
                let _ = client.publish(reply, body.into()).await;
            }
            Pace::Each(pause) => {
                let client = client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(pause).await;
                    let _ = client.publish(reply, body.into()).await;
                });
            }
        }
    }
}
