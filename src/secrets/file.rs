//! The `file` source: a local JSON file mapping secret ids to values, for development without AWS.
//!
//! ```json
//! { "dev/payments/api": "sk_test_123",
//!   "dev/maps/api": { "token": "abc", "master_secret_id": "dev/maps/master" } }
//! ```
//! A string value is the secret's text; an object is serialised back to JSON text, so that a
//! route's `secret_field` picks a field from it just as from a JSON `SecretString` in AWS. A value
//! may also be keyed by stage: `{ "AWSCURRENT": "...", "AWSPENDING": "..." }` is read as stages when
//! every key of the object is a stage name starting with `AWS`. The file is read on every fetch,
//! and the cache polls this source every second, so an edit is live within about a second.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::{Secret, SecretSource, SecretVersion, SourceError};

/// Reads secrets from a local JSON file.
#[derive(Debug, Clone)]
pub struct FileSource {
    /// The JSON file.
    path: PathBuf,
}

impl FileSource {
    /// A source over `path` (read lazily, on each fetch).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource { path: path.into() }
    }

    fn read(&self, id: &str, stage: &str) -> Result<SecretVersion, SourceError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| SourceError::Unreachable {
            id: id.to_owned(),
            detail: format!("cannot read {}: {e}", self.path.display()),
        })?;
        // serde_json's error names line and column only, never the text around them.
        let doc: Value = serde_json::from_str(&text).map_err(|e| SourceError::Invalid {
            id: id.to_owned(),
            detail: format!("{} is not valid JSON ({e})", self.path.display()),
        })?;
        let Value::Object(map) = doc else {
            return Err(SourceError::Invalid {
                id: id.to_owned(),
                detail: format!("{} must hold a JSON object", self.path.display()),
            });
        };
        let entry = map.get(id).ok_or_else(|| SourceError::NotFound {
            id: id.to_owned(),
            detail: format!("no key {id:?} in {}", self.path.display()),
        })?;
        let value = match entry {
            Value::Object(o) if !o.is_empty() && o.keys().all(|k| k.starts_with("AWS")) => {
                o.get(stage).ok_or_else(|| SourceError::NotFound {
                    id: id.to_owned(),
                    detail: format!("no stage {stage:?} in {}", self.path.display()),
                })?
            }
            other => {
                if stage != "AWSCURRENT" {
                    return Err(SourceError::NotFound {
                        id: id.to_owned(),
                        detail: format!(
                            "stage {stage:?} requested, but {} holds only one value",
                            self.path.display()
                        ),
                    });
                }
                other
            }
        };
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Object(_) => value.to_string(),
            _ => {
                return Err(SourceError::Invalid {
                    id: id.to_owned(),
                    detail: "a value in the secrets file must be a string or an object".into(),
                })
            }
        };
        let version_id = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| format!("file-{}", d.as_nanos()));
        Ok(SecretVersion {
            version_id,
            value: Secret::new(text),
        })
    }
}

impl SecretSource for FileSource {
    fn fetch<'a>(
        &'a self,
        id: &'a str,
        stage: &'a str,
    ) -> BoxFuture<'a, Result<SecretVersion, SourceError>> {
        Box::pin(async move { self.read(id, stage) })
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }

    fn name(&self) -> &'static str {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, body: &str) -> PathBuf {
        let p = dir.join("secrets.json");
        std::fs::write(&p, body).expect("write");
        p
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keyproxy-file-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn reads_string_object_and_stages() {
        let d = tmpdir("read");
        let p = write(
            &d,
            r#"{"a":"k1","b":{"token":"t"},"c":{"AWSCURRENT":"cur","AWSPENDING":"pen"}}"#,
        );
        let s = FileSource::new(&p);
        assert_eq!(s.read("a", "AWSCURRENT").expect("a").value.expose(), "k1");
        assert_eq!(
            s.read("b", "AWSCURRENT").expect("b").value.expose(),
            r#"{"token":"t"}"#
        );
        assert_eq!(s.read("c", "AWSPENDING").expect("c").value.expose(), "pen");
        assert!(matches!(
            s.read("zz", "AWSCURRENT"),
            Err(SourceError::NotFound { .. })
        ));
        assert!(matches!(
            s.read("a", "AWSPENDING"),
            Err(SourceError::NotFound { .. })
        ));
    }

    #[test]
    fn bad_json_is_invalid_and_names_no_value() {
        let d = tmpdir("bad");
        let p = write(&d, r#"{"a": "sk_live_leak", "#);
        let err = FileSource::new(&p)
            .read("a", "AWSCURRENT")
            .expect_err("bad");
        assert_eq!(err.kind(), "invalid_value");
        assert!(!err.to_string().contains("sk_live_leak"));
    }

    #[test]
    fn missing_file_is_unreachable() {
        let err = FileSource::new("/nonexistent/keyproxy.json")
            .read("a", "AWSCURRENT")
            .expect_err("missing");
        assert_eq!(err.kind(), "unreachable");
    }
}
