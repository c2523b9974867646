//! Which live worker holds the IDLE session of which identity: a pure rule
//! every worker computes the same way from the same inputs (the membership
//! and the identities wanting IDLE), so no per-identity row is needed in
//! Cassandra to agree on it.
//!
//! The rule is weighted rendezvous hashing (highest random weight): each
//! identity goes to the worker whose score `budget / -ln(u)` is highest,
//! where `u` in (0, 1) comes from a hash of the identity and the worker id.
//! With equal budgets every worker is equally likely; with unequal ones the
//! odds follow the budgets. A worker that joins takes about 1/N of the
//! identities (only those it now scores highest on) and a worker that
//! leaves gives away only its own.
//!
//! Bounded loads: a worker takes at most its budget, and at most a fair
//! share with 10 % of slack (`max(ceil(fair), floor(1.1 fair))`, fair being
//! the identities times its budget over the total budget), so a handful of
//! identities still spread evenly while at scale the slack is so far above
//! the natural spread that overflow is rare. An identity whose first choice
//! is full goes to its next-ranked worker with room, identities taken in a
//! fixed order (by their hash), so the overflow is as deterministic as the
//! rest.
//!
//! The hash is a fixed mixer (FNV-1a over the bytes, then splitmix64's
//! finaliser), never std's randomly keyed hasher: workers built and started
//! apart must agree.

use std::cmp::Ordering;

use uuid::Uuid;

/// (user_id, identity_id).
pub type Key = (Uuid, Uuid);

/// A live worker as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    pub worker: String,
    /// Its `idle_max`: the weight of its scores and its hard cap.
    pub budget: u32,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// splitmix64's finaliser: every input bit reaches every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The hash of an identity, the same in every process and build.
pub fn key_hash(key: &Key) -> u64 {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(key.0.as_bytes());
    bytes[16..].copy_from_slice(key.1.as_bytes());
    mix(fnv1a(&bytes))
}

/// The hash of a worker id.
pub fn worker_hash(worker: &str) -> u64 {
    mix(fnv1a(worker.as_bytes()) ^ 0x9e37_79b9_7f4a_7c15)
}

/// The weighted rendezvous score of an identity (by its hash) on a worker.
fn score(key_hash: u64, worker_hash: u64, budget: u32) -> f64 {
    let h = mix(key_hash ^ worker_hash.rotate_left(17));
    // 53 bits into (0, 1): never 0 nor 1, so the logarithm is finite and < 0.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(budget) / -u.ln()
}

/// How many identities a worker may take: its budget, and a fair share of
/// `n` with 10 % of slack.
fn cap(n: usize, budget: u32, total: u64) -> usize {
    if total == 0 {
        return 0;
    }
    let num = n as u128 * u128::from(budget);
    let total = u128::from(total);
    let fair_up = num.div_ceil(total);
    let slack = num * 11 / (total * 10);
    fair_up.max(slack).min(u128::from(budget)) as usize
}

/// Assign each of `wanted` to a member (an index into `members`), or to
/// none when every budget is full. The answer depends only on the sets
/// given, not on their order.
pub fn assign(members: &[Member], wanted: &[Key]) -> Vec<Option<usize>> {
    let live: Vec<(usize, u64, u32)> = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.budget > 0)
        .map(|(i, m)| (i, worker_hash(&m.worker), m.budget))
        .collect();
    let mut out = vec![None; wanted.len()];
    if live.is_empty() {
        return out;
    }
    let total: u64 = live.iter().map(|l| u64::from(l.2)).sum();
    let caps: Vec<usize> = live.iter().map(|l| cap(wanted.len(), l.2, total)).collect();
    let mut load = vec![0usize; live.len()];
    let mut order: Vec<(u64, usize)> = wanted
        .iter()
        .enumerate()
        .map(|(i, k)| (key_hash(k), i))
        .collect();
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(wanted[a.1].cmp(&wanted[b.1])));
    let mut ranked: Vec<(f64, usize)> = Vec::with_capacity(live.len());
    for (h, i) in order {
        ranked.clear();
        ranked.extend(
            live.iter()
                .enumerate()
                .map(|(j, l)| (score(h, l.1, l.2), j)),
        );
        let by_rank = |a: &(f64, usize), b: &(f64, usize)| {
            b.0.partial_cmp(&a.0)
                .unwrap_or(Ordering::Equal)
                .then_with(|| {
                    members[live[a.1].0]
                        .worker
                        .cmp(&members[live[b.1].0].worker)
                })
        };
        let first = ranked
            .iter()
            .copied()
            .min_by(by_rank)
            .map(|(_, j)| j)
            .unwrap_or(0);
        let chosen = if load[first] < caps[first] {
            Some(first)
        } else {
            ranked.sort_by(by_rank);
            ranked.iter().map(|r| r.1).find(|&j| load[j] < caps[j])
        };
        if let Some(j) = chosen {
            load[j] += 1;
            out[i] = Some(live[j].0);
        }
    }
    out
}

/// The identities of `wanted` assigned to `me`.
pub fn mine(members: &[Member], wanted: &[Key], me: &str) -> Vec<Key> {
    let Some(me) = members.iter().position(|m| m.worker == me) else {
        return Vec::new();
    };
    assign(members, wanted)
        .into_iter()
        .zip(wanted)
        .filter(|(owner, _)| *owner == Some(me))
        .map(|(_, k)| *k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn keys(n: u64, seed: u64) -> Vec<Key> {
        (0..n)
            .map(|i| {
                let a = mix(seed ^ mix(2 * i + 1));
                let b = mix(a ^ 0x5151);
                let c = mix(b);
                let d = mix(c);
                (Uuid::from_u64_pair(a, b), Uuid::from_u64_pair(c, d))
            })
            .collect()
    }

    fn members(n: usize, budget: u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                worker: format!("host{i}-{}-{:04x}", 1000 + i, i * 7919 % 65536),
                budget,
            })
            .collect()
    }

    /// Identity -> worker id.
    fn owners(ms: &[Member], ks: &[Key]) -> HashMap<Key, Option<String>> {
        assign(ms, ks)
            .into_iter()
            .zip(ks)
            .map(|(o, k)| (*k, o.map(|i| ms[i].worker.clone())))
            .collect()
    }

    fn loads(ms: &[Member], ks: &[Key]) -> Vec<usize> {
        let mut l = vec![0; ms.len()];
        for o in assign(ms, ks).into_iter().flatten() {
            l[o] += 1;
        }
        l
    }

    #[test]
    fn the_hash_is_fixed_across_processes_and_builds() {
        // Golden values: a change here reshuffles every deployment's sessions.
        let k = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert_eq!(key_hash(&k), key_hash(&k));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
    }

    #[test]
    fn the_assignment_does_not_depend_on_the_order_of_its_inputs() {
        let ks = keys(2000, 1);
        let ms = members(5, 1000);
        let a = owners(&ms, &ks);
        let (mut ks2, mut ms2) = (ks.clone(), ms.clone());
        ks2.reverse();
        ms2.rotate_left(2);
        assert_eq!(a, owners(&ms2, &ks2));
    }

    #[test]
    fn a_few_identities_are_split_evenly() {
        let ms = members(2, 1000);
        assert_eq!(loads(&ms, &keys(4, 7)), vec![2, 2]);
        assert_eq!(loads(&ms[..1], &keys(4, 7)), vec![4]);
        assert_eq!(loads(&members(3, 1000), &keys(5, 3)).iter().max(), Some(&2));
    }

    #[test]
    fn identities_are_balanced_within_budgets() {
        let ks = keys(10_000, 2);
        let l = loads(&members(10, 5000), &ks);
        assert_eq!(l.iter().sum::<usize>(), 10_000);
        assert!(l.iter().all(|&x| (900..=1100).contains(&x)), "{l:?}");
        // Weighted: a worker with three times the budget takes about three times as many.
        let mut ms = members(2, 1000);
        ms[1].budget = 3000;
        let l = loads(&ms, &keys(2000, 3));
        assert!((400..=600).contains(&l[0]), "{l:?}");
        // Budgets short of the identities: each full, the rest unassigned.
        let l = loads(&members(3, 100), &keys(1000, 4));
        assert_eq!(l, vec![100, 100, 100]);
    }

    #[test]
    fn a_joining_worker_takes_about_one_nth_and_only_for_itself() {
        let ks = keys(20_000, 5);
        let ms = members(11, 5000);
        let before = owners(&ms[..10], &ks);
        let after = owners(&ms, &ks);
        let moved: Vec<_> = ks.iter().filter(|k| before[k] != after[k]).collect();
        let share = moved.len() as f64 / ks.len() as f64;
        assert!((0.08..=0.1).contains(&share), "{share}");
        assert!(moved
            .iter()
            .all(|k| after[*k].as_deref() == Some(ms[10].worker.as_str())));
    }

    #[test]
    fn a_leaving_worker_gives_away_only_its_own() {
        let ks = keys(20_000, 6);
        let ms = members(10, 5000);
        let before = owners(&ms, &ks);
        let after = owners(&ms[1..], &ks);
        for k in &ks {
            if before[k].as_deref() != Some(ms[0].worker.as_str()) {
                assert_eq!(before[k], after[k]);
            } else {
                assert!(after[k].is_some());
            }
        }
    }

    #[test]
    fn a_full_worker_overflows_to_the_next_ranked() {
        // One worker with a budget of 10 next to a large one.
        let mut ms = members(2, 10_000);
        ms[0].budget = 10;
        let ks = keys(1000, 8);
        let l = loads(&ms, &ks);
        assert_eq!(l.iter().sum::<usize>(), 1000);
        assert!(l[0] <= 10, "{l:?}");
        assert_eq!(mine(&ms, &ks, &ms[0].worker).len(), l[0]);
        assert!(mine(&ms, &ks, "nobody").is_empty());
    }
}
