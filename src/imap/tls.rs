//! TLS policy: certificates are always verified.
//!
//! Trust comes from the system roots (rustls-native-certs), plus an optional
//! global CA file (`imap.ca_file`) and a per-identity one (`infos.cafile`).
//! A pinned certificate (`infos.cert_sha256`, SHA-256 of the DER) replaces
//! chain validation by "exactly this certificate" — the handshake signature is
//! still checked. There is no switch to turn verification off; a failed
//! verification is an error, never a fallback.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Install the process-wide crypto provider (ring). Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn system_roots() -> &'static Vec<CertificateDer<'static>> {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let res = rustls_native_certs::load_native_certs();
        for e in &res.errors {
            tracing::warn!(error = %e, "some system CA certificates could not be loaded");
        }
        res.certs
    })
}

const NO_TRUST: &str = "no trusted CA certificate on this machine: install the system CA \
     certificates (Debian: ca-certificates) or set imap.ca_file";

/// Refuse to run with no trust at all: without it every account would fail
/// TLS and, after 72 h, be disabled for a fault of this machine.
pub fn check_trust(ca_file: &str) -> Result<(), String> {
    if !ca_file.is_empty() {
        return read_pem_certs(Path::new(ca_file)).map(|_| ());
    }
    if system_roots().is_empty() {
        return Err(NO_TRUST.into());
    }
    Ok(())
}

/// Read every certificate of a PEM file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM in CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in CA file {}", path.display()));
    }
    Ok(certs)
}

/// Parse a pinned SHA-256 fingerprint: 64 hex digits, colons allowed.
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if hex.len() != 64 {
        return Err(format!(
            "certificate pin must be a SHA-256 in hex (64 digits), found {} digits",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| "bad hex".to_string())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| format!("bad hex digit in pin: {s:?}"))?;
    }
    Ok(out)
}

/// What a client config trusts: each CA file as it is on disk now (a file
/// changed or replaced since makes a new config, as reading it per
/// connection did), and the pin.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Trust {
    files: Vec<(PathBuf, Option<SystemTime>, u64)>,
    pin: Option<[u8; 32]>,
}

/// The config of every connection that trusts the same: one root store
/// (the system's ~150 roots parsed, ~50 KiB) shared by all of them, where
/// a config built per connection stayed in memory as long as its
/// connection (rustls keeps it for the session's lifetime): a held IDLE
/// session's largest cost. Held weakly: a config lives while a connection
/// uses it, so the map holds no more entries than there are distinct
/// trusts among live connections (pinned identities each have their own).
pub fn shared_client_config(
    extra_ca: &[&Path],
    pin: Option<[u8; 32]>,
) -> Result<Arc<ClientConfig>, String> {
    static LIVE: OnceLock<Mutex<HashMap<Trust, Weak<ClientConfig>>>> = OnceLock::new();
    let files = extra_ca
        .iter()
        .map(|p| {
            // A file we cannot stat fails in client_config, with its reason.
            let meta = std::fs::metadata(p).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            (p.to_path_buf(), modified, meta.map_or(0, |m| m.len()))
        })
        .collect();
    let trust = Trust { files, pin };
    let live = LIVE.get_or_init(Default::default);
    if let Some(config) = lock(live).get(&trust).and_then(Weak::upgrade) {
        return Ok(config);
    }
    // Built outside the lock (it reads files); two connections racing here
    // build twice and the later one is kept: harmless.
    let config = client_config(extra_ca, pin)?;
    let mut map = lock(live);
    map.retain(|_, c| c.strong_count() > 0);
    map.insert(trust, Arc::downgrade(&config));
    Ok(config)
}

/// The map even if a thread panicked holding it (it is only a cache).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client config trusting the system roots plus `extra_ca` files, or only
/// the pinned certificate when `pin` is set. Without TLS session
/// resumption, as before configs were shared: its tickets would otherwise
/// be kept in every config (memory), and a resumed session skips the
/// certificate check a fresh handshake makes.
pub fn client_config(
    extra_ca: &[&Path],
    pin: Option<[u8; 32]>,
) -> Result<Arc<ClientConfig>, String> {
    install_provider();
    let provider = rustls::crypto::ring::default_provider();
    let builder = ClientConfig::builder_with_provider(Arc::new(provider.clone()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if let Some(pin) = pin {
        builder
            .dangerous() // not dangerous: the pin is a stricter check than a CA
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin,
                algs: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
        for path in extra_ca {
            for cert in read_pem_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
            }
        }
        if roots.is_empty() {
            return Err(NO_TRUST.into());
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let mut config = config;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts exactly one server certificate, known by its SHA-256.
#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "server certificate does not match the pinned SHA-256".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Protocol name as Caliopen's Go worker wrote it in X-Fetched-Imap.
pub fn version_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_2) => "tls1.2",
        Some(rustls::ProtocolVersion::TLSv1_3) => "tls1.3",
        Some(rustls::ProtocolVersion::TLSv1_1) => "tls1.1",
        Some(rustls::ProtocolVersion::TLSv1_0) => "tls1.0",
        _ => "",
    }
}

/// IANA name of a cipher suite (rustls spells TLS 1.3 suites `TLS13_...`).
pub fn suite_name(s: Option<rustls::SupportedCipherSuite>) -> String {
    match s {
        None => String::new(),
        Some(s) => {
            let n = format!("{:?}", s.suite());
            match n.strip_prefix("TLS13_") {
                Some(rest) => format!("TLS_{rest}"),
                None => n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins() {
        let hex = "00".repeat(31) + "ff";
        assert_eq!(parse_pin(&hex).unwrap()[31], 0xff);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&colons).unwrap()[0], 0xab);
        assert!(parse_pin("abc").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn system_config_builds() {
        client_config(&[], None).unwrap();
    }

    #[test]
    fn connections_that_trust_the_same_share_one_config() {
        let a = shared_client_config(&[], None).unwrap();
        let b = shared_client_config(&[], None).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one root store for every connection");
        let pinned = shared_client_config(&[], Some([7; 32])).unwrap();
        assert!(!Arc::ptr_eq(&a, &pinned), "a pin is a trust of its own");
        let other_pin = shared_client_config(&[], Some([8; 32])).unwrap();
        assert!(!Arc::ptr_eq(&pinned, &other_pin));
        let resumption = format!("{:?}", a.resumption);
        assert!(
            resumption.contains("NoClientSessionStorage"),
            "{resumption}"
        );
    }

    #[test]
    fn a_config_no_connection_uses_is_dropped_and_a_changed_ca_file_is_read_again() {
        let dir = std::env::temp_dir().join(format!("tls-share-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ca.pem");
        let roots = system_roots();
        let pem = |n: usize| {
            roots[..n]
                .iter()
                .map(|c| {
                    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, c);
                    format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
                })
                .collect::<String>()
        };
        std::fs::write(&file, pem(1)).unwrap();
        let a = shared_client_config(&[&file], None).unwrap();
        let weak = Arc::downgrade(&a);
        assert!(Arc::ptr_eq(
            &a,
            &shared_client_config(&[&file], None).unwrap()
        ));
        std::fs::write(&file, pem(2)).unwrap(); // longer: changed
        let b = shared_client_config(&[&file], None).unwrap();
        assert!(!Arc::ptr_eq(&a, &b), "the changed file is read again");
        drop(a);
        assert_eq!(weak.strong_count(), 0, "the cache keeps no config alive");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
