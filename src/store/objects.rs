//! Object storage of raw messages larger than `store_settings.raw_size_limit`,
//! laid out as Caliopen lays it out, so its Python reader finds them:
//! bucket `object_store_settings.buckets.raw_messages`, key the bare
//! `raw_msg_id`, content type `application/octet-stream`, and the row's
//! `uri` is `s3://<bucket>/<raw_msg_id>` (bucket = host, key = path).
//!
//! Why here and not in Cassandra: Caliopen's operators choose the largest row
//! they accept; mail with large attachments must still arrive. The object is
//! written before the row that points at it, so a row never points at a
//! missing object; ids are deterministic, so a refetch overwrites the same
//! object instead of adding one.
//!
//! Uploads read the fetched buffer in parts of [`PART_SIZE`], one part at a
//! time (multipart above one part), at most [`UPLOADS_AT_ONCE`] per process,
//! so uploads hold at most a few part copies on top of the messages the
//! worker's byte budget already accounts for.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use s3::command::Command;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::request::tokio_backend::ReqwestRequest;
use s3::request::Request;
use s3::{Bucket, BucketConfiguration, Region};

use crate::config::{StoreSettings, WorkerSettings};

/// Caliopen's content type for raw message objects.
pub const CONTENT_TYPE: &str = "application/octet-stream";

/// Size of one multipart part: S3's minimum (except the last), since the
/// client copies each part twice (into its `Vec`, then into the request).
pub const PART_SIZE: usize = 5 * 1024 * 1024;

/// Uploads at once per process: each holds up to two part copies besides the
/// message (already in the byte budget), so this bounds the extra memory.
const UPLOADS_AT_ONCE: usize = 2;

/// Name of the raw-message bucket in `object_store_settings.buckets`.
pub const RAW_MESSAGES: &str = "raw_messages";

/// Region signed when `location` is empty (what most servers expect).
const DEFAULT_REGION: &str = "us-east-1";

/// One S3 request may take this long (a part of [`PART_SIZE`] on a slow link).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// Settings that cannot work; reported at start-up.
    #[error("{0}")]
    Config(String),
    /// The server refused or could not be reached: an outage of ours.
    #[error("object store: {op} {key:?}: {detail}")]
    S3 {
        op: &'static str,
        key: String,
        detail: String,
    },
}

fn s3_err(op: &'static str, key: &str, e: impl std::fmt::Display) -> ObjectError {
    ObjectError::S3 {
        op,
        key: key.to_string(),
        detail: e.to_string(),
    }
}

/// The raw-message bucket of one object store. Cheap to clone.
#[derive(Clone)]
pub struct Objects {
    bucket: Box<Bucket>,
    uploads: Arc<Semaphore>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("Objects")
            .field("bucket", &self.bucket.name)
            .field("endpoint", &self.bucket.region.endpoint())
            .finish()
    }
}

/// May a message be larger than `raw_size_limit` (and so need the object
/// store)? `max_message_size` bounds what we accept at all.
pub fn needed(s: &WorkerSettings) -> bool {
    s.imap.max_message_size > s.store_settings.raw_size_limit
}

/// The object store the settings ask for: `Ok(None)` when none is configured
/// (no endpoint); an error when the one configured is unsupported. Without
/// one, a message over `raw_size_limit` cannot be kept and is stepped over
/// as oversize (see [`without_store_warning`]), as Caliopen's Go worker
/// fails it ("Object too large to fit into cassandra").
pub fn from_worker_settings(s: &WorkerSettings) -> Result<Option<Objects>, ObjectError> {
    let st = &s.store_settings;
    if st.object_store_settings.endpoint.trim().is_empty() {
        return Ok(None);
    }
    Objects::new(st).map(Some)
}

/// What to warn about at start-up when messages may exceed `raw_size_limit`
/// and no object store is configured; `None` when that cannot happen.
pub fn without_store_warning(s: &WorkerSettings, objects: Option<&Objects>) -> Option<String> {
    (objects.is_none() && needed(s)).then(|| {
        format!(
            "imap.max_message_size ({}) exceeds store_settings.raw_size_limit ({}) but no object \
             store is configured (store_settings.object_store_settings.endpoint is empty): \
             messages over {} bytes will be stepped over and listed; configure S3, or set \
             imap.max_message_size to at most raw_size_limit",
            s.imap.max_message_size,
            s.store_settings.raw_size_limit,
            s.store_settings.raw_size_limit
        )
    })
}

impl Objects {
    /// The client of `store_settings`' object store (no request yet).
    pub fn new(st: &StoreSettings) -> Result<Objects, ObjectError> {
        if !st.object_store.trim().eq_ignore_ascii_case("s3") {
            return Err(ObjectError::Config(format!(
                "store_settings.object_store: only \"s3\" is supported, found {:?}",
                st.object_store
            )));
        }
        let o = &st.object_store_settings;
        let name = o.buckets.get(RAW_MESSAGES).map(|b| b.trim()).unwrap_or("");
        if name.is_empty() {
            return Err(ObjectError::Config(
                "store_settings.object_store_settings.buckets.raw_messages: must name a bucket"
                    .into(),
            ));
        }
        let endpoint = endpoint_url(&o.endpoint)?;
        let region = Region::Custom {
            region: if o.location.trim().is_empty() {
                DEFAULT_REGION.to_string()
            } else {
                o.location.trim().to_string()
            },
            endpoint,
        };
        let creds = Credentials::new(
            Some(o.access_key.as_str()),
            Some(o.secret_key.as_str()),
            None,
            None,
            None,
        )
        .map_err(|e| ObjectError::Config(format!("object store credentials: {e}")))?;
        let bucket = Bucket::new(name, region, creds)
            .map_err(|e| ObjectError::Config(format!("object store client: {e}")))?
            .with_path_style()
            .with_request_timeout(REQUEST_TIMEOUT)
            .map_err(|e| ObjectError::Config(format!("object store client: {e}")))?;
        Ok(Objects {
            bucket,
            uploads: Arc::new(Semaphore::new(UPLOADS_AT_ONCE)),
        })
    }

    pub fn bucket_name(&self) -> &str {
        &self.bucket.name
    }

    /// `s3://<bucket>/<key>`, the row's `uri`.
    pub fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket.name)
    }

    /// Does the bucket exist, and may our key use it? A HEAD on the bucket
    /// (S3's HeadBucket, what minio-go's `BucketExists` sends for Caliopen's
    /// Go code): a key limited to its own bucket may ask that, while
    /// ListBuckets needs a right over the whole server and may not list a
    /// bucket shared with the key.
    pub async fn bucket_exists(&self) -> Result<bool, ObjectError> {
        let name = &self.bucket.name;
        // "/" is the bucket itself: `HEAD /<bucket>/`.
        let code = match self.bucket.head_object("/").await {
            Ok((_, code)) => code,
            Err(S3Error::HttpFailWithBody(code, _)) => code,
            Err(e) => return Err(s3_err("head bucket", name, e)),
        };
        match code {
            200..=299 => Ok(true),
            404 => Ok(false),
            403 => Err(s3_err(
                "head bucket",
                name,
                "HTTP 403: this key may not use the bucket",
            )),
            c => Err(s3_err("head bucket", name, format!("HTTP {c}"))),
        }
    }

    /// Create the bucket when it does not exist yet (start-up, and each
    /// health check: see [`super::health`]).
    pub async fn ensure_bucket(&self) -> Result<(), ObjectError> {
        let name = self.bucket.name.clone();
        if self.bucket_exists().await? {
            return Ok(());
        }
        // As S3 (and minio-go, Caliopen's client) want it: no location
        // constraint for us-east-1, the location otherwise. (rust-s3's own
        // create call always sends one, which servers refuse for us-east-1.)
        let mut config = BucketConfiguration::default();
        if self.bucket.region.to_string() != DEFAULT_REGION {
            config.set_region(self.bucket.region.clone());
        }
        let request = ReqwestRequest::new(&self.bucket, "", Command::CreateBucket { config })
            .await
            .map_err(|e| s3_err("create bucket", &name, e))?;
        let r = match request.response_data(false).await {
            Ok(r) => r,
            // Created meanwhile by another worker: fine.
            Err(S3Error::HttpFailWithBody(409, _)) => return Ok(()),
            Err(e) => return Err(s3_err("create bucket", &name, e)),
        };
        // Another worker may have created it meanwhile.
        if (200..300).contains(&r.status_code()) || r.status_code() == 409 {
            tracing::info!(bucket = %name, "object store bucket created");
            Ok(())
        } else {
            Err(s3_err(
                "create bucket",
                &name,
                format!(
                    "HTTP {}: {}",
                    r.status_code(),
                    first_line(&String::from_utf8_lossy(r.as_slice()))
                ),
            ))
        }
    }

    /// Store the bytes of `pieces`, in order, under `key`, replacing any
    /// object of that key. Above one part, a multipart upload copying one
    /// part at a time out of the pieces.
    pub async fn put(&self, key: &str, pieces: &[&[u8]]) -> Result<(), ObjectError> {
        let _slot = self
            .uploads
            .acquire()
            .await
            .expect("the upload semaphore is never closed");
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        if len <= PART_SIZE {
            let r = self
                .bucket
                .put_object_with_content_type(key, &pieces.concat(), CONTENT_TYPE)
                .await
                .map_err(|e| s3_err("put", key, e))?;
            return status_ok("put", key, r.status_code(), r.as_slice());
        }
        let up = self
            .bucket
            .initiate_multipart_upload(key, CONTENT_TYPE)
            .await
            .map_err(|e| s3_err("start multipart upload", key, e))?;
        let mut parts = Vec::with_capacity(len.div_ceil(PART_SIZE));
        for (i, chunk) in Parts::new(pieces, PART_SIZE).enumerate() {
            let part = self
                .bucket
                .put_multipart_chunk(chunk, key, i as u32 + 1, &up.upload_id, CONTENT_TYPE)
                .await;
            match part {
                Ok(p) => parts.push(p),
                Err(e) => {
                    self.abort(key, &up.upload_id).await;
                    return Err(s3_err("upload part", key, e));
                }
            }
        }
        match self
            .bucket
            .complete_multipart_upload(key, &up.upload_id, parts)
            .await
        {
            Ok(r) => status_ok("complete multipart upload", key, r.status_code(), &[]),
            Err(e) => {
                self.abort(key, &up.upload_id).await;
                Err(s3_err("complete multipart upload", key, e))
            }
        }
    }

    /// Best effort: an abandoned upload only costs the server space.
    async fn abort(&self, key: &str, upload_id: &str) {
        if let Err(e) = self.bucket.abort_upload(key, upload_id).await {
            tracing::warn!(key, error = %e, "cannot abort a multipart upload");
        }
    }

    /// The object stored under `key` (tests, tools).
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        let r = self
            .bucket
            .get_object(key)
            .await
            .map_err(|e| s3_err("get", key, e))?;
        status_ok("get", key, r.status_code(), r.as_slice())?;
        Ok(r.to_vec())
    }

    /// The object a row's `uri` names, read as Caliopen's reader does
    /// (bucket = host, key = path), in whatever bucket it names.
    pub async fn get_uri(&self, uri: &str) -> Result<Vec<u8>, ObjectError> {
        let (bucket, key) = parse_uri(uri).ok_or_else(|| ObjectError::S3 {
            op: "parse uri",
            key: uri.to_string(),
            detail: "expected s3://<bucket>/<key>".into(),
        })?;
        if bucket == self.bucket.name {
            return self.get(key).await;
        }
        let mut other = self.bucket.clone();
        other.name = bucket.to_string();
        let r = other
            .get_object(key)
            .await
            .map_err(|e| s3_err("get", key, e))?;
        status_ok("get", key, r.status_code(), r.as_slice())?;
        Ok(r.to_vec())
    }

    /// Keys of the bucket starting with `prefix` (tests, tools).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, ObjectError> {
        let pages = self
            .bucket
            .list(prefix.to_string(), None)
            .await
            .map_err(|e| s3_err("list", prefix, e))?;
        Ok(pages
            .into_iter()
            .flat_map(|p| p.contents.into_iter().map(|o| o.key))
            .collect())
    }
}

/// Consecutive parts of `size` bytes (the last one shorter) of the bytes of
/// several pieces, each copied into a buffer of its own as it is asked for.
struct Parts<'p> {
    pieces: &'p [&'p [u8]],
    /// Position in `pieces[0]`.
    at: usize,
    size: usize,
}

impl<'p> Parts<'p> {
    fn new(pieces: &'p [&'p [u8]], size: usize) -> Self {
        Self {
            pieces,
            at: 0,
            size,
        }
    }
}

impl Iterator for Parts<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let mut part = Vec::new();
        while part.len() < self.size {
            let (first, rest) = self.pieces.split_first()?;
            let take = (first.len() - self.at).min(self.size - part.len());
            if part.is_empty() {
                part.reserve_exact(
                    self.size
                        .min(take + rest.iter().map(|p| p.len()).sum::<usize>()),
                );
            }
            part.extend_from_slice(&first[self.at..self.at + take]);
            self.at += take;
            if self.at == first.len() {
                self.pieces = rest;
                self.at = 0;
            }
            if self.pieces.is_empty() {
                break;
            }
        }
        (!part.is_empty()).then_some(part)
    }
}

fn status_ok(op: &'static str, key: &str, status: u16, body: &[u8]) -> Result<(), ObjectError> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(s3_err(
            op,
            key,
            format!(
                "HTTP {status}: {}",
                first_line(&String::from_utf8_lossy(body))
            ),
        ))
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

/// Caliopen writes the endpoint as `host:port` (plain HTTP, as its MinIO
/// client is set up); a full `http://` or `https://` URL is taken as is.
fn endpoint_url(endpoint: &str) -> Result<String, ObjectError> {
    let e = endpoint.trim().trim_end_matches('/');
    if e.is_empty() {
        return Err(ObjectError::Config(
            "store_settings.object_store_settings.endpoint: must not be empty".into(),
        ));
    }
    if e.starts_with("http://") || e.starts_with("https://") {
        return Ok(e.to_string());
    }
    if e.contains("://") {
        return Err(ObjectError::Config(format!(
            "store_settings.object_store_settings.endpoint: expected host:port or an http(s) URL, found {e:?}"
        )));
    }
    Ok(format!("http://{e}"))
}

/// `s3://bucket/key` → (bucket, key), the way Caliopen's reader splits it.
pub fn parse_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoint: &str, max: u64, limit: u64) -> WorkerSettings {
        let mut s = WorkerSettings::default();
        s.imap.max_message_size = max;
        s.store_settings.raw_size_limit = limit;
        let o = &mut s.store_settings.object_store_settings;
        o.endpoint = endpoint.into();
        o.buckets.insert(RAW_MESSAGES.into(), "raw".into());
        s
    }

    #[test]
    fn parts_cut_across_pieces_in_order() {
        let cut = |pieces: &[&[u8]], size| Parts::new(pieces, size).collect::<Vec<_>>();
        assert_eq!(
            cut(&[b"ab", b"cdefg"], 3),
            [b"abc".to_vec(), b"def".to_vec(), b"g".to_vec()]
        );
        assert_eq!(cut(&[b"", b"abcd"], 2), [b"ab".to_vec(), b"cd".to_vec()]);
        assert_eq!(cut(&[b"abc", b""], 5), [b"abc".to_vec()]);
        assert!(cut(&[b"", b""], 4).is_empty());
        let big: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let joined: Vec<u8> = cut(&[&big[..7], &big[7..]], 64).concat();
        assert_eq!(joined, big);
    }

    #[test]
    fn needed_only_when_messages_can_exceed_the_limit() {
        let none = settings("", 100, 100);
        assert!(from_worker_settings(&none).unwrap().is_none());
        assert_eq!(without_store_warning(&none, None), None);
        // Starts all the same, with a warning.
        let over = settings("", 101, 100);
        assert!(from_worker_settings(&over).unwrap().is_none());
        let w = without_store_warning(&over, None).unwrap();
        assert!(
            w.contains("no object store") && w.contains("stepped over"),
            "{w}"
        );
        let o = from_worker_settings(&settings("127.0.0.1:9", 101, 100)).unwrap();
        assert_eq!(without_store_warning(&over, o.as_ref()), None);
        assert_eq!(o.unwrap().uri("k"), "s3://raw/k");
    }

    #[test]
    fn unsupported_store_and_missing_bucket_are_refused() {
        let mut s = settings("h:1", 2, 1);
        s.store_settings.object_store = "swift".into();
        assert!(from_worker_settings(&s)
            .unwrap_err()
            .to_string()
            .contains("only \"s3\""));
        let mut s = settings("h:1", 2, 1);
        s.store_settings.object_store_settings.buckets.clear();
        assert!(from_worker_settings(&s)
            .unwrap_err()
            .to_string()
            .contains("raw_messages"));
    }

    #[test]
    fn endpoints_and_uris() {
        assert_eq!(endpoint_url("minio:9090").unwrap(), "http://minio:9090");
        assert_eq!(
            endpoint_url("https://s3.example/").unwrap(),
            "https://s3.example"
        );
        assert!(endpoint_url("ftp://x").is_err());
        let id = "0b5e4a3c-0000-5000-8000-000000000001";
        assert_eq!(parse_uri(&format!("s3://raw/{id}")), Some(("raw", id)));
        assert_eq!(parse_uri("s3://raw/"), None);
        assert_eq!(parse_uri("http://raw/x"), None);
    }

    #[test]
    fn debug_hides_credentials() {
        let mut s = settings("h:1", 2, 1);
        s.store_settings.object_store_settings.secret_key = "s3cr3t".into();
        s.store_settings.object_store_settings.access_key = "AKIDX".into();
        let o = Objects::new(&s.store_settings).unwrap();
        let d = format!("{o:?}");
        assert!(!d.contains("s3cr3t") && !d.contains("AKIDX"), "{d}");
    }
}
