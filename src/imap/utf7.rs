//! Modified UTF-7 (RFC 3501 §5.1.3), the form IMAP gives mailbox names on
//! the wire.
//!
//! Users and Caliopen name folders in UTF-8 (`Entwürfe`, `日本語`); servers
//! want and send `Entw&APw-rfe`, `&ZeVnLIqe-`. We convert at the IMAP edge
//! only: everything above it (orders, `X-Fetched-Imap-Box`, state rows) holds
//! UTF-8, as Caliopen's Go worker did through go-imap.
//!
//! Written here rather than taken from crates.io: the one crate for it
//! (`utf7-imap` 0.3) panics on bad base64, replaces invalid UTF-16 silently,
//! passes DEL through unencoded, and has no error type; names come from
//! remote servers, so bad input must be a typed error, never a panic.
//!
//! Decoding is strict, as Dovecot and go-imap are: printable ASCII must stand
//! for itself, a shift sequence must be closed, its bits must be a whole
//! number of UTF-16 units with zero padding, surrogates must pair, and two
//! shift sequences may not follow each other (they would have been one).
//! With that, `encode(decode(s)) == s` for every `s` that decodes.

use std::fmt;

/// Why a name is not valid modified UTF-7. The input is kept (truncated for
/// the message) so a log line says which name was bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Utf7Error {
    input: String,
    /// Byte offset in `input` where the problem was found.
    pub at: usize,
    pub kind: Utf7ErrorKind,
}

/// What was wrong, for callers that branch (tests, mostly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf7ErrorKind {
    /// A byte outside printable ASCII where a character should stand for
    /// itself (controls, DEL, 8-bit).
    RawByte,
    /// A character that is not in the modified base64 alphabet.
    BadBase64,
    /// `&` with no closing `-`.
    Unterminated,
    /// Leftover bits that are not zero, or not a whole UTF-16 unit.
    BadPadding,
    /// A lone or reversed UTF-16 surrogate.
    BadSurrogate,
    /// Printable ASCII encoded, which must stand for itself.
    EncodedAscii,
    /// Two shift sequences in a row (a minimal encoder writes one).
    AdjacentShift,
}

impl Utf7ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            Utf7ErrorKind::RawByte => "a character that must be encoded",
            Utf7ErrorKind::BadBase64 => "a character outside modified base64",
            Utf7ErrorKind::Unterminated => "an '&' sequence with no closing '-'",
            Utf7ErrorKind::BadPadding => "an '&' sequence with stray bits",
            Utf7ErrorKind::BadSurrogate => "an unpaired UTF-16 surrogate",
            Utf7ErrorKind::EncodedAscii => "printable ASCII encoded in an '&' sequence",
            Utf7ErrorKind::AdjacentShift => "two '&' sequences in a row",
        }
    }
}

impl fmt::Display for Utf7Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line whatever the input: {:?} escapes newlines and controls.
        const MAX: usize = 80;
        let shown: String = self.input.chars().take(MAX).collect();
        let more = if self.input.chars().count() > MAX {
            "…"
        } else {
            ""
        };
        write!(
            f,
            "mailbox name {shown:?}{more} is not valid modified UTF-7: {} at byte {}",
            self.kind.describe(),
            self.at
        )
    }
}

impl std::error::Error for Utf7Error {}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

fn is_direct(c: u32) -> bool {
    (0x20..=0x7e).contains(&c) && c != u32::from(b'&')
}

fn b64_value(b: u8) -> Option<u32> {
    match b {
        b'A'..=b'Z' => Some(u32::from(b - b'A')),
        b'a'..=b'z' => Some(u32::from(b - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(b - b'0') + 52),
        b'+' => Some(62),
        b',' => Some(63),
        _ => None,
    }
}

/// UTF-8 to modified UTF-7. Every string has an encoding, so this cannot
/// fail.
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    let mut units: Vec<u16> = Vec::new();
    for c in name.chars() {
        if is_direct(u32::from(c)) {
            flush(&mut units, &mut out);
            out.push(c);
        } else if c == '&' {
            flush(&mut units, &mut out);
            out.push_str("&-");
        } else {
            let mut buf = [0u16; 2];
            units.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut units, &mut out);
    out
}

/// Writes the pending UTF-16 units as one `&…-` sequence.
fn flush(units: &mut Vec<u16>, out: &mut String) {
    if units.is_empty() {
        return;
    }
    out.push('&');
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &u in units.iter() {
        acc = (acc << 16) | u32::from(u);
        bits += 16;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 0x3f) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 0x3f) as usize] as char);
    }
    out.push('-');
    units.clear();
}

/// Modified UTF-7 to UTF-8; a typed error naming the input when it is not
/// valid (see the module doc for what "valid" means here).
pub fn decode(wire: &str) -> Result<String, Utf7Error> {
    let err = |at: usize, kind: Utf7ErrorKind| Utf7Error {
        input: wire.to_string(),
        at,
        kind,
    };
    let bytes = wire.as_bytes();
    let mut out = String::with_capacity(wire.len());
    let mut i = 0;
    // True right after a base64 sequence: another one may not follow.
    let mut after_shift = false;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'&' {
            if !is_direct(u32::from(b)) {
                return Err(err(i, Utf7ErrorKind::RawByte));
            }
            out.push(b as char);
            after_shift = false;
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        if bytes.get(i) == Some(&b'-') {
            out.push('&');
            after_shift = false;
            i += 1;
            continue;
        }
        if after_shift {
            return Err(err(start, Utf7ErrorKind::AdjacentShift));
        }
        i = decode_shifted(bytes, start, i, &mut out).map_err(|(at, kind)| err(at, kind))?;
        i += 1; // the '-'
        after_shift = true;
    }
    Ok(out)
}

/// Decode the base64 run of UTF-16 that starts at `i`, just after the `&`
/// at `start`, onto `out`; the index of its closing `-`, or where and why
/// it is not valid.
fn decode_shifted(
    bytes: &[u8],
    start: usize,
    mut i: usize,
    out: &mut String,
) -> Result<usize, (usize, Utf7ErrorKind)> {
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut high: Option<u16> = None;
    loop {
        let Some(&c) = bytes.get(i) else {
            return Err((start, Utf7ErrorKind::Unterminated));
        };
        if c == b'-' {
            break;
        }
        let v = b64_value(c).ok_or((i, Utf7ErrorKind::BadBase64))?;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 16 {
            bits -= 16;
            let unit = (acc >> bits) as u16;
            acc &= (1 << bits) - 1;
            push_unit(unit, &mut high, out).map_err(|kind| (i, kind))?;
        }
        i += 1;
    }
    // At most 4 leftover bits (a partial sextet) may remain, all zero;
    // 6 or more means a base64 character too many.
    if high.is_some() {
        return Err((i, Utf7ErrorKind::BadSurrogate));
    }
    if bits >= 6 || acc != 0 {
        return Err((i, Utf7ErrorKind::BadPadding));
    }
    Ok(i)
}

/// One UTF-16 unit of a shifted run: a character, or the first half of a
/// surrogate pair kept in `high`.
fn push_unit(unit: u16, high: &mut Option<u16>, out: &mut String) -> Result<(), Utf7ErrorKind> {
    match high.take() {
        Some(h) => {
            if !(0xDC00..=0xDFFF).contains(&unit) {
                return Err(Utf7ErrorKind::BadSurrogate);
            }
            let c = 0x10000 + ((u32::from(h) - 0xD800) << 10) + (u32::from(unit) - 0xDC00);
            out.push(char::from_u32(c).expect("a surrogate pair is a scalar value"));
        }
        None => match unit {
            0xD800..=0xDBFF => *high = Some(unit),
            0xDC00..=0xDFFF => return Err(Utf7ErrorKind::BadSurrogate),
            _ => {
                let u = u32::from(unit);
                if is_direct(u) || u == u32::from(b'&') {
                    return Err(Utf7ErrorKind::EncodedAscii);
                }
                out.push(char::from_u32(u).expect("not a surrogate"));
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(wire: &str) -> Utf7ErrorKind {
        decode(wire).unwrap_err().kind
    }

    #[test]
    fn rfc_3501_example() {
        // RFC 3501 §5.1.3: "~peter/mail/台北/日本語".
        let utf8 = "~peter/mail/\u{53F0}\u{5317}/\u{65E5}\u{672C}\u{8A9E}";
        let wire = "~peter/mail/&U,BTFw-/&ZeVnLIqe-";
        assert_eq!(encode(utf8), wire);
        assert_eq!(decode(wire).unwrap(), utf8);
    }

    #[test]
    fn umlaut_and_cjk() {
        assert_eq!(encode("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(decode("Entw&APw-rfe").unwrap(), "Entwürfe");
        assert_eq!(encode("日本語"), "&ZeVnLIqe-");
        assert_eq!(decode("&ZeVnLIqe-").unwrap(), "日本語");
        assert_eq!(encode("Отправленные"), "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-");
    }

    #[test]
    fn ampersand() {
        assert_eq!(encode("&"), "&-");
        assert_eq!(decode("&-").unwrap(), "&");
        assert_eq!(encode("R&D"), "R&-D");
        assert_eq!(decode("&-&-").unwrap(), "&&");
        // An '&' right after a base64 run is not a second run.
        assert_eq!(encode("ü&"), "&APw-&-");
        assert_eq!(decode("&APw-&-").unwrap(), "ü&");
    }

    #[test]
    fn emoji_are_surrogate_pairs() {
        // U+1F600 is D83D DE00 in UTF-16.
        assert_eq!(encode("😀"), "&2D3eAA-");
        assert_eq!(decode("&2D3eAA-").unwrap(), "😀");
        assert_eq!(decode(&encode("a😀b🎉ü")).unwrap(), "a😀b🎉ü");
    }

    #[test]
    fn ascii_and_controls() {
        assert_eq!(encode("INBOX"), "INBOX");
        assert_eq!(encode(""), "");
        assert_eq!(decode("").unwrap(), "");
        // Controls and DEL are not printable: encoded.
        assert_eq!(encode("a\tb"), "a&AAk-b");
        assert_eq!(decode("a&AAk-b").unwrap(), "a\tb");
        assert_eq!(decode(&encode("\u{7f}")).unwrap(), "\u{7f}");
    }

    #[test]
    fn round_trips() {
        for s in [
            "INBOX",
            "Entwürfe",
            "日本語",
            "a&b&&c",
            "😀😀",
            "~peter/mail/台北/日本語",
            "Éé-&-ü",
            "\u{FFFF}\u{10FFFF}\u{80}",
            "x\u{0}y",
        ] {
            let wire = encode(s);
            assert!(wire.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{wire}");
            assert_eq!(decode(&wire).unwrap(), s, "{wire}");
            assert_eq!(encode(&decode(&wire).unwrap()), wire);
        }
    }

    #[test]
    fn rejects_invalid_input() {
        assert_eq!(kind("&U,BTFw"), Utf7ErrorKind::Unterminated);
        assert_eq!(kind("&"), Utf7ErrorKind::Unterminated);
        assert_eq!(kind("&AP*-"), Utf7ErrorKind::BadBase64);
        assert_eq!(kind("&AP/-"), Utf7ErrorKind::BadBase64); // '/' is ',' here
        assert_eq!(kind("&APw=-"), Utf7ErrorKind::BadBase64); // no padding
                                                              // "A" encoded (0x0041).
        assert_eq!(kind("&AEE-"), Utf7ErrorKind::EncodedAscii);
        // "&" encoded (0x0026): it must be "&-".
        assert_eq!(kind("&ACY-"), Utf7ErrorKind::EncodedAscii);
        // Stray bits: "APx" leaves non-zero padding, "APwA" a sextet too many.
        assert_eq!(kind("&APx-"), Utf7ErrorKind::BadPadding);
        assert_eq!(kind("&APwA-"), Utf7ErrorKind::BadPadding);
        assert_eq!(kind("&AP-"), Utf7ErrorKind::BadPadding);
        // A high surrogate alone, a low surrogate alone.
        assert_eq!(kind("&2D0-"), Utf7ErrorKind::BadSurrogate);
        assert_eq!(kind("&3gA-"), Utf7ErrorKind::BadSurrogate);
        assert_eq!(kind("&2D0AQQ-"), Utf7ErrorKind::BadSurrogate);
        // Raw 8-bit, controls and DEL must be encoded.
        assert_eq!(kind("Entwürfe"), Utf7ErrorKind::RawByte);
        assert_eq!(kind("a\tb"), Utf7ErrorKind::RawByte);
        assert_eq!(kind("a\u{7f}"), Utf7ErrorKind::RawByte);
        // Two runs in a row are one run written badly.
        assert_eq!(kind("&APw-&APw-"), Utf7ErrorKind::AdjacentShift);
    }

    #[test]
    fn error_is_one_line_naming_the_input() {
        let e = decode("bad\n&AEE-").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains(r#""bad\n&AEE-""#), "{e}");
        assert!(e.contains("not valid modified UTF-7"), "{e}");
        let long = format!("{}&", "x".repeat(500));
        let e = decode(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }
}
