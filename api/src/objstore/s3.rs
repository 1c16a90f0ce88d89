//! A small S3 client: signed requests (rusty-s3 signs, ureq sends) to one
//! bucket under one key prefix, through any of several endpoints.
//!
//! A distributed object store such as Garage answers on every node, so a
//! store lists them all: a request that cannot reach one node, or that a
//! node answers with a server error, is sent to the next, and the node
//! that answered is tried first next time. Every request made here may be
//! repeated safely (a PUT of a pack or manifest writes the same bytes).

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

/// How long a signed request stays valid: it is sent at once.
const SIGNED_FOR: Duration = Duration::from_secs(600);
/// Rounds over every endpoint before a request gives up.
const ROUNDS: u32 = 4;
/// The largest object read whole (a manifest or a pack).
const MAX_OBJECT: u64 = 1 << 30;

/// Errors of the S3 client.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// No endpoint could be reached, or each failed.
    #[error("no endpoint of the object store answered ({0}); check that it runs and the network between")]
    Unreachable(String),
    /// The object store refused the request.
    #[error("the object store refused {what}: HTTP {status}: {body}")]
    Refused {
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The store's explanation (its XML error, shortened).
        body: String,
    },
    /// An answer could not be read or parsed.
    #[error("the object store's answer to {what} is unreadable: {why}")]
    BadAnswer {
        /// The request.
        what: String,
        /// Why.
        why: String,
    },
    /// The location or credentials are unusable.
    #[error("{0}")]
    Config(String),
}

/// One object of a listing.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The key below the store's prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A bucket and prefix reached through one or more endpoints.
pub struct S3 {
    buckets: Vec<Bucket>,
    creds: Credentials,
    prefix: String,
    http: ureq::Agent,
    /// The endpoint to try first: the last that answered.
    current: AtomicUsize,
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3")
            .field("bucket", &self.buckets[0].name())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

enum Attempt<T> {
    Done(T),
    /// Worth another endpoint: a transport failure or a server error.
    Retry(String),
    Fail(S3Error),
}

impl S3 {
    /// A client of `bucket` under `prefix` (no leading or trailing `/`)
    /// through `endpoints` (`http://` or `https://` URLs).
    pub fn new(
        endpoints: &[String],
        region: &str,
        bucket: &str,
        prefix: &str,
        creds: Credentials,
    ) -> Result<S3, S3Error> {
        if endpoints.is_empty() {
            return Err(S3Error::Config(
                "no object store endpoint: set S3_ENDPOINT (or endpoint= in the store URL)".into(),
            ));
        }
        let buckets = endpoints
            .iter()
            .map(|e| {
                let url: url::Url = e
                    .parse()
                    .map_err(|err| S3Error::Config(format!("endpoint {e}: {err}")))?;
                Bucket::new(url, UrlStyle::Path, bucket.to_string(), region.to_string())
                    .map_err(|err| S3Error::Config(format!("endpoint {e}: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let http = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout_read(Duration::from_secs(60))
            .timeout_write(Duration::from_secs(60))
            .build();
        let prefix = prefix.trim_matches('/');
        Ok(S3 {
            buckets,
            creds,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            http,
            current: AtomicUsize::new(0),
        })
    }

    /// `bucket/prefix` for messages.
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.buckets[0].name(), self.prefix)
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// Runs `one` against each endpoint in turn, from the last that
    /// answered, for a few rounds with a growing pause between them.
    fn each<T>(&self, what: &str, one: impl Fn(&Bucket) -> Attempt<T>) -> Result<T, S3Error> {
        let n = self.buckets.len();
        let mut last = String::new();
        let mut pause = Duration::from_millis(100);
        for round in 0..ROUNDS {
            let first = self.current.load(Ordering::Relaxed);
            for i in 0..n {
                let at = (first + i) % n;
                match one(&self.buckets[at]) {
                    Attempt::Done(v) => {
                        self.current.store(at, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Attempt::Fail(e) => return Err(e),
                    Attempt::Retry(why) => {
                        tracing::debug!(endpoint = %self.buckets[at].base_url(), %why, what, "object store request failed; trying the next endpoint");
                        last = format!("{}: {why}", self.buckets[at].base_url());
                    }
                }
            }
            if round + 1 < ROUNDS {
                std::thread::sleep(pause);
                pause *= 3;
            }
        }
        Err(S3Error::Unreachable(format!("{what}: {last}")))
    }

    /// Sorts ureq's outcome: success, worth retrying elsewhere, or final.
    fn outcome(
        what: &str,
        r: Result<ureq::Response, ureq::Error>,
        absent_ok: bool,
    ) -> Attempt<Option<ureq::Response>> {
        match r {
            Ok(resp) => Attempt::Done(Some(resp)),
            Err(ureq::Error::Status(404, _)) if absent_ok => Attempt::Done(None),
            Err(ureq::Error::Status(s, resp)) if s >= 500 || s == 429 => {
                Attempt::Retry(format!("HTTP {s}: {}", short_body(resp)))
            }
            Err(ureq::Error::Status(status, resp)) => Attempt::Fail(S3Error::Refused {
                what: what.to_string(),
                status,
                body: short_body(resp),
            }),
            Err(ureq::Error::Transport(t)) => Attempt::Retry(t.to_string()),
        }
    }

    /// The whole object, or `None` if there is none.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let key = self.key(rel);
        let what = format!("GET {key}");
        self.each(&what, |b| {
            let url = b.get_object(Some(&self.creds), &key).sign(SIGNED_FOR);
            match Self::outcome(&what, self.http.get(url.as_str()).call(), true) {
                Attempt::Done(Some(r)) => match read_all(r, MAX_OBJECT) {
                    Ok(v) => Attempt::Done(Some(v)),
                    Err(e) => Attempt::Retry(e.to_string()),
                },
                Attempt::Done(None) => Attempt::Done(None),
                Attempt::Retry(w) => Attempt::Retry(w),
                Attempt::Fail(e) => Attempt::Fail(e),
            }
        })
    }

    /// `len` bytes of the object from `start`; `None` if there is no
    /// object. A negative `start` reads that many bytes from the end.
    pub fn get_range(&self, rel: &str, start: i64, len: u64) -> Result<Option<Vec<u8>>, S3Error> {
        let key = self.key(rel);
        let what = format!("GET {key} (range)");
        let range = if start < 0 {
            format!("bytes=-{}", start.unsigned_abs())
        } else {
            format!("bytes={start}-{}", start as u64 + len.max(1) - 1)
        };
        self.each(&what, |b| {
            let url = b.get_object(Some(&self.creds), &key).sign(SIGNED_FOR);
            let r = self.http.get(url.as_str()).set("Range", &range).call();
            match Self::outcome(&what, r, true) {
                Attempt::Done(Some(r)) => match read_all(r, len.max(start.unsigned_abs())) {
                    Ok(v) => Attempt::Done(Some(v)),
                    Err(e) => Attempt::Retry(e.to_string()),
                },
                Attempt::Done(None) => Attempt::Done(None),
                Attempt::Retry(w) => Attempt::Retry(w),
                Attempt::Fail(e) => Attempt::Fail(e),
            }
        })
    }

    /// The object's size, or `None` if there is none.
    pub fn head(&self, rel: &str) -> Result<Option<u64>, S3Error> {
        let key = self.key(rel);
        let what = format!("HEAD {key}");
        self.each(&what, |b| {
            let url = b.head_object(Some(&self.creds), &key).sign(SIGNED_FOR);
            match Self::outcome(&what, self.http.head(url.as_str()).call(), true) {
                Attempt::Done(r) => Attempt::Done(r.map(|r| {
                    r.header("Content-Length")
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0)
                })),
                Attempt::Retry(w) => Attempt::Retry(w),
                Attempt::Fail(e) => Attempt::Fail(e),
            }
        })
    }

    /// Writes the object whole. Once this returns, the store holds it
    /// durably (S3's contract for a completed PUT).
    pub fn put(&self, rel: &str, body: &[u8]) -> Result<(), S3Error> {
        self.put_inner(rel, body, false).map(|_| ())
    }

    /// Writes the object only if there is none under that key: false if
    /// there was. (An `If-None-Match: *` PUT; a second writer racing
    /// this one on a store without conditional writes could still win.)
    pub fn put_new(&self, rel: &str, body: &[u8]) -> Result<bool, S3Error> {
        if self.head(rel)?.is_some() {
            return Ok(false);
        }
        self.put_inner(rel, body, true)
    }

    fn put_inner(&self, rel: &str, body: &[u8], only_new: bool) -> Result<bool, S3Error> {
        let key = self.key(rel);
        let what = format!("PUT {key}");
        self.each(&what, |b| {
            let mut action = b.put_object(Some(&self.creds), &key);
            if only_new {
                action.headers_mut().insert("if-none-match", "*");
            }
            let url = action.sign(SIGNED_FOR);
            let mut req = self.http.put(url.as_str());
            if only_new {
                req = req.set("If-None-Match", "*");
            }
            match req.send_bytes(body) {
                Err(ureq::Error::Status(412, _)) if only_new => Attempt::Done(false),
                r => match Self::outcome(&what, r, false) {
                    Attempt::Done(_) => Attempt::Done(true),
                    Attempt::Retry(w) => Attempt::Retry(w),
                    Attempt::Fail(e) => Attempt::Fail(e),
                },
            }
        })
    }

    /// Deletes the object (nothing if there is none).
    pub fn delete(&self, rel: &str) -> Result<(), S3Error> {
        let key = self.key(rel);
        let what = format!("DELETE {key}");
        self.each(&what, |b| {
            let url = b.delete_object(Some(&self.creds), &key).sign(SIGNED_FOR);
            match Self::outcome(&what, self.http.delete(url.as_str()).call(), true) {
                Attempt::Done(_) => Attempt::Done(()),
                Attempt::Retry(w) => Attempt::Retry(w),
                Attempt::Fail(e) => Attempt::Fail(e),
            }
        })
    }

    /// Every object whose key starts with `rel_prefix`, keys relative to
    /// the store's prefix. A listing may lag behind recent writes on some
    /// stores; callers never rely on it to see an object just written.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<Listed>, S3Error> {
        let key = self.key(rel_prefix);
        let what = format!("LIST {key}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.each(&what, |b| {
                let mut action = b.list_objects_v2(Some(&self.creds));
                action.with_prefix(key.as_str());
                if let Some(t) = &token {
                    action.with_continuation_token(t.as_str());
                }
                let url = action.sign(SIGNED_FOR);
                match Self::outcome(&what, self.http.get(url.as_str()).call(), false) {
                    Attempt::Done(Some(r)) => {
                        let body = match read_all(r, 64 << 20) {
                            Ok(b) => b,
                            Err(e) => return Attempt::Retry(e.to_string()),
                        };
                        match rusty_s3::actions::ListObjectsV2::parse_response(&body) {
                            Ok(p) => Attempt::Done(p),
                            Err(e) => Attempt::Fail(S3Error::BadAnswer {
                                what: what.clone(),
                                why: e.to_string(),
                            }),
                        }
                    }
                    Attempt::Done(None) => unreachable!("a listing is never absent"),
                    Attempt::Retry(w) => Attempt::Retry(w),
                    Attempt::Fail(e) => Attempt::Fail(e),
                }
            })?;
            for c in page.contents {
                // Listings are asked for with encoding-type=url.
                let key = percent_encoding::percent_decode_str(&c.key).decode_utf8_lossy();
                if let Some(k) = key.strip_prefix(&self.prefix) {
                    out.push(Listed {
                        key: k.to_string(),
                        size: c.size,
                    });
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }
}

fn read_all(r: ureq::Response, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.into_reader().take(limit).read_to_end(&mut v)?;
    Ok(v)
}

/// The error body of a refused request, shortened for a message.
fn short_body(r: ureq::Response) -> String {
    let body = read_all(r, 4096).unwrap_or_default();
    let s = String::from_utf8_lossy(&body);
    // S3 errors are XML: the <Message> says the most.
    match (s.find("<Message>"), s.find("</Message>")) {
        (Some(a), Some(b)) if a < b => s[a + 9..b].to_string(),
        _ => s.chars().take(200).collect(),
    }
}
