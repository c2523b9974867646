//! Modified UTF-7: decode never panics on any text; whatever decodes
//! encodes back to the same bytes (the decoder is strict, so there is one
//! spelling per name); and any UTF-8 name survives encode then decode.
#![no_main]

use caliopen_imap::imap::utf7::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match decode(s) {
        Ok(name) => assert_eq!(encode(&name), s, "non-canonical input accepted"),
        Err(e) => assert!(!e.to_string().contains('\n')),
    }
    let wire = encode(s);
    assert!(wire.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{wire:?}");
    assert_eq!(decode(&wire).as_deref(), Ok(s));
});
