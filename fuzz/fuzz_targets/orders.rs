//! Worker orders: any bytes on the order subject go through the same JSON
//! decoding and per-order checks as the worker's handlers. Must never
//! panic, and every refusal is one line (it is logged and sent back).
#![no_main]

use caliopen_imap::bus::wire::ImapOrder;
use caliopen_imap::worker::orders;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let order: ImapOrder = match serde_json::from_slice(data) {
        Ok(o) => o,
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "{e}");
            return;
        }
    };
    if let Err(e) = orders::validate(&order) {
        assert!(!e.contains('\n') && !e.contains('\r'), "{e:?}");
    }
    // The order re-encodes (orders are forwarded as they came, e.g. deliver).
    let back = serde_json::to_vec(&order).unwrap();
    let again: ImapOrder = serde_json::from_slice(&back).unwrap();
    assert_eq!(again, order);
});
