//! Where an object-storage store is: `s3://BUCKET[/PREFIX][?endpoint=URL[,URL…]&region=R]`,
//! with credentials from a file or the environment.
//!
//! The file uses the environment's names, one `NAME=value` per line
//! (`#` comments, optional quotes), so the same values work in both:
//!
//! ```text
//! AWS_ACCESS_KEY_ID=GK…
//! AWS_SECRET_ACCESS_KEY=…
//! S3_ENDPOINTS="http://node1:3900 http://node2:3900"   # or S3_ENDPOINT / AWS_ENDPOINT_URL
//! S3_REGION=garage                                      # or AWS_REGION
//! ```
//!
//! The URL's own `endpoint=` and `region=` win over both. A secret is
//! never part of the URL, which is shown in listings and logs.

use std::collections::HashMap;
use std::path::Path;

use super::s3::S3Error;

/// A parsed store location with its credentials.
#[derive(Clone)]
pub struct S3Location {
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside it (may be empty).
    pub prefix: String,
    /// Endpoints to try, in order.
    pub endpoints: Vec<String>,
    /// The signing region.
    pub region: String,
    /// Access key id.
    pub key_id: String,
    /// Secret key.
    pub secret: String,
}

impl std::fmt::Debug for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Location")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoints", &self.endpoints)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Whether `s` names an object-storage store.
pub fn is_s3(s: &str) -> bool {
    s.starts_with("s3://")
}

/// Reads `NAME=value` lines.
fn read_env_file(path: &Path) -> Result<HashMap<String, String>, S3Error> {
    use std::os::unix::fs::MetadataExt;
    // A secret others can read is no secret: refuse, as ssh does.
    if let Ok(m) = std::fs::metadata(path) {
        if m.mode() & 0o004 != 0 {
            return Err(S3Error::Config(format!(
                "the object store credentials {} are readable by every user; run chmod 600 on it",
                path.display()
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        S3Error::Config(format!(
            "cannot read the object store credentials {}: {e}",
            path.display()
        ))
    })?;
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            out.insert(k.trim().to_string(), v.to_string());
        }
    }
    Ok(out)
}

impl S3Location {
    /// Parses `url`, taking what it lacks from `creds_file` if given,
    /// else from the environment.
    pub fn parse(url: &str, creds_file: Option<&Path>) -> Result<S3Location, S3Error> {
        let vars = match creds_file {
            Some(p) => read_env_file(p)?,
            None => std::env::vars().collect(),
        };
        Self::parse_with(url, &vars)
    }

    fn parse_with(url: &str, vars: &HashMap<String, String>) -> Result<S3Location, S3Error> {
        let bad = |why: &str| S3Error::Config(format!("store {url}: {why}"));
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("an object store is written s3://BUCKET/PREFIX"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3-63 lowercase letters, digits, '-' or '.'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        let prefix_ok = prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
            && !prefix
                .split('/')
                .any(|p| p == ".." || p == "." || p.is_empty() && !prefix.is_empty());
        if !prefix_ok {
            return Err(bad(
                "the prefix may hold letters, digits, '-', '_', '.' and '/' between non-empty parts",
            ));
        }
        let mut endpoints: Vec<String> = Vec::new();
        let mut region = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", v)) => endpoints.extend(v.split(',').map(str::to_string)),
                Some(("region", v)) => region = Some(v.to_string()),
                _ => {
                    return Err(bad(&format!(
                        "unknown option {pair:?} (endpoint=, region=)"
                    )))
                }
            }
        }
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| vars.get(*n).filter(|v| !v.is_empty()).cloned())
        };
        if endpoints.is_empty() {
            if let Some(list) = var(&["S3_ENDPOINTS"]) {
                endpoints.extend(
                    list.split([' ', ','])
                        .filter(|e| !e.is_empty())
                        .map(str::to_string),
                );
            } else if let Some(e) = var(&["S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
            {
                endpoints.push(e);
            }
        }
        if endpoints.is_empty() {
            return Err(bad(
                "no endpoint: add ?endpoint=http://host:port, or set S3_ENDPOINT in the credentials file or the environment",
            ));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(bad(&format!(
                    "endpoint {e} is not an http:// or https:// URL"
                )));
            }
        }
        let region = region
            .or_else(|| var(&["S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"]))
            .unwrap_or_else(|| "us-east-1".into());
        let key_id = var(&["AWS_ACCESS_KEY_ID"]).ok_or_else(|| {
            bad("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass a credentials file")
        })?;
        let secret = var(&["AWS_SECRET_ACCESS_KEY"])
            .ok_or_else(|| bad("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"))?;
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoints,
            region,
            key_id,
            secret,
        })
    }

    /// The URL without options, for people and logs.
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn urls_and_variables_combine_with_the_url_winning() {
        let v = vars(&[
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "sec"),
            ("S3_ENDPOINTS", "http://a:1 http://b:2"),
            ("S3_REGION", "garage"),
        ]);
        let l = S3Location::parse_with("s3://nova/site-a/x", &v).unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("nova", "site-a/x"));
        assert_eq!(l.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(l.region, "garage");
        let l = S3Location::parse_with("s3://nova?endpoint=http://c:3&region=r", &v).unwrap();
        assert_eq!(
            (
                l.endpoints[0].as_str(),
                l.region.as_str(),
                l.prefix.as_str()
            ),
            ("http://c:3", "r", "")
        );
        assert!(
            !format!("{l:?}").contains("sec"),
            "no secret in debug output"
        );
    }

    #[test]
    fn bad_locations_say_what_is_wrong() {
        let v = vars(&[("AWS_ACCESS_KEY_ID", "id"), ("AWS_SECRET_ACCESS_KEY", "s")]);
        for (url, says) in [
            ("s3://nova/p", "no endpoint"),
            ("s3://Nova?endpoint=http://a", "bucket name"),
            ("s3://nova/../x?endpoint=http://a", "prefix"),
            ("s3://nova/a//b?endpoint=http://a", "prefix"),
            ("s3://nova?endpoint=ftp://a", "not an http"),
            ("s3://nova?endpoint=http://a&x=1", "unknown option"),
        ] {
            let e = S3Location::parse_with(url, &v).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
        let e = S3Location::parse_with("s3://nova?endpoint=http://a", &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no credentials"), "{e}");
    }

    #[test]
    fn a_credentials_file_reads_like_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("env");
        std::fs::write(
            &p,
            "# garage\nS3_ENDPOINT=http://127.0.0.1:3900\nexport AWS_ACCESS_KEY_ID='GK1'\nAWS_SECRET_ACCESS_KEY=\"s e\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = S3Location::parse("s3://nova/p", Some(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let l = S3Location::parse("s3://nova/p", Some(&p)).unwrap();
        assert_eq!((l.key_id.as_str(), l.secret.as_str()), ("GK1", "s e"));
        assert_eq!(l.endpoints, ["http://127.0.0.1:3900"]);
    }
}
