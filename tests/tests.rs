//! The one integration target: every test here talks to the real local
//! stack (NATS, Cassandra, Dovecot) started by `scripts/stack.sh up`.
//! One module per area; helpers in `util.rs`.

// Settings are built field by field from the defaults: clearer in tests.
#![allow(clippy::field_reassign_with_default)]

mod util;

mod alerts;
mod bus;
mod config;
mod ctl;
mod dispatch;
mod docs;
mod folders;
mod idle;
mod image;
mod mailboxes;
mod objects;
mod ops;
mod polite;
mod poller;
mod resync;
mod store;
mod sync_faults;
mod worker;
