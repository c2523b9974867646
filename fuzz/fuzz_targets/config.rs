//! The config loader: any text as the YAML file, through the daemons' own
//! path (defaults, then the text, then the environment; then validation).
//! Must never panic; a refusal is one line.
#![no_main]

use caliopen_imap::config::{from_yaml_str, ConfigError, PollerSettings, WorkerSettings};
use libfuzzer_sys::fuzz_target;

fn one_line(f: &ConfigError) {
    let text = f.to_string();
    assert!(!text.contains('\n') && !text.contains('\r'), "{text:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match from_yaml_str::<WorkerSettings>(text, None) {
        Ok(s) => {
            let _ = s.validate();
        }
        Err(e) => one_line(&e),
    }
    match from_yaml_str::<PollerSettings>(text, None) {
        Ok(s) => {
            let _ = s.validate();
        }
        Err(e) => one_line(&e),
    }
});
