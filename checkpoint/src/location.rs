//! Where a checkpoint lives, parsed once: a local directory (a path or `file://…`) or an S3
//! prefix (`s3://bucket[/prefix]`). Every place that accepts a checkpoint URL (the job spec,
//! the CLI, the registry and its roots) goes through [`CheckpointLocation::parse`], so they
//! all agree on what is local, what is S3 and what is refused: any other scheme is an error
//! naming it, never a local path that happens to contain `://`.
//!
//! Local paths are kept as written until a caller says what it is about to do:
//! [`CheckpointLocation::absolute`] (lexically, for specs written before the directory exists
//! and read on other hosts), [`CheckpointLocation::for_reading`] (resolve symlinks of a
//! directory that must exist: registry roots, registration) or
//! [`CheckpointLocation::for_writing`] (create it, then resolve).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A checkpoint root.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CheckpointLocation {
    /// A directory on this host, as written (may be relative until made absolute).
    Local(PathBuf),
    /// Objects in `bucket` under `prefix`: key segments joined by `/`, no leading or trailing
    /// slash, no empty, `.` or `..` segment (may be empty: the whole bucket).
    S3 { bucket: String, prefix: String },
}

/// Why a string is not a checkpoint location, or a local one cannot be used as asked.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error(
        "bad checkpoint location {location:?}: scheme {scheme:?} is not supported (only local paths, file:// and s3://)"
    )]
    UnknownScheme { location: String, scheme: String },
    #[error("bad checkpoint location {location:?}: no bucket name after s3:// (expected s3://bucket[/prefix])")]
    NoBucket { location: String },
    #[error(
        "bad checkpoint location {location:?}: key segment {segment:?} is not allowed (expected s3://bucket[/prefix])"
    )]
    BadKeySegment { location: String, segment: String },
    #[error("bad checkpoint location {location:?}: empty path")]
    EmptyPath { location: String },
    #[error("checkpoint location {location}: {source}")]
    Missing {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint location {location} is not a directory")]
    NotADirectory { location: String },
    #[error("checkpoint location {location}: cannot create directory: {source}")]
    CannotCreate {
        location: String,
        #[source]
        source: std::io::Error,
    },
}

impl LocationError {
    /// Nothing usable at a local location: missing, or not a directory. (A server that opens
    /// locations its clients name answers these like "no checkpoint there".)
    pub fn is_absent(&self) -> bool {
        matches!(
            self,
            LocationError::Missing { .. } | LocationError::NotADirectory { .. }
        )
    }
}

const S3_SCHEME: &str = "s3://";
const FILE_SCHEME: &str = "file://";

impl CheckpointLocation {
    /// A local path, `file:///abs/path` or `s3://bucket[/prefix]`.
    pub fn parse(text: &str) -> Result<CheckpointLocation, LocationError> {
        if let Some(rest) = text.strip_prefix(S3_SCHEME) {
            return parse_s3(text, rest);
        }
        let path = match text.strip_prefix(FILE_SCHEME) {
            Some(path) => path,
            None => match text.split_once("://") {
                Some((scheme, _)) => {
                    return Err(LocationError::UnknownScheme {
                        location: text.to_string(),
                        scheme: format!("{scheme}://"),
                    });
                }
                None => text,
            },
        };
        if path.is_empty() {
            return Err(LocationError::EmptyPath {
                location: text.to_string(),
            });
        }
        Ok(CheckpointLocation::Local(PathBuf::from(path)))
    }

    pub fn is_local(&self) -> bool {
        matches!(self, CheckpointLocation::Local(_))
    }

    /// The directory of a local location (`None` for S3).
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            CheckpointLocation::Local(p) => Some(p),
            CheckpointLocation::S3 { .. } => None,
        }
    }

    /// A relative local path made absolute against the current directory, by name only (no
    /// file system access, so it works before the directory exists). S3 is returned as is.
    pub fn absolute(&self) -> CheckpointLocation {
        match self {
            CheckpointLocation::Local(p) => {
                CheckpointLocation::Local(std::path::absolute(p).unwrap_or_else(|_| p.clone()))
            }
            s3 => s3.clone(),
        }
    }

    /// For reading: a local directory must exist and is returned canonical (symlinks
    /// resolved), so a later symlink swap cannot change what was checked. Nothing is created.
    pub fn for_reading(&self) -> Result<CheckpointLocation, LocationError> {
        let CheckpointLocation::Local(path) = self else {
            return Ok(self.clone());
        };
        let canonical = std::fs::canonicalize(path).map_err(|source| LocationError::Missing {
            location: self.to_string(),
            source,
        })?;
        if !canonical.is_dir() {
            return Err(LocationError::NotADirectory {
                location: self.to_string(),
            });
        }
        Ok(CheckpointLocation::Local(canonical))
    }

    /// For writing: a local directory is created if missing, then returned canonical.
    pub fn for_writing(&self) -> Result<CheckpointLocation, LocationError> {
        if let CheckpointLocation::Local(path) = self {
            std::fs::create_dir_all(path).map_err(|source| LocationError::CannotCreate {
                location: self.to_string(),
                source,
            })?;
        }
        self.for_reading()
    }
}

fn parse_s3(text: &str, rest: &str) -> Result<CheckpointLocation, LocationError> {
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(LocationError::NoBucket {
            location: text.to_string(),
        });
    }
    let segments: Vec<&str> = key.split('/').filter(|s| !s.is_empty()).collect();
    if let Some(bad) = segments.iter().find(|s| **s == "." || **s == "..") {
        return Err(LocationError::BadKeySegment {
            location: text.to_string(),
            segment: bad.to_string(),
        });
    }
    Ok(CheckpointLocation::S3 {
        bucket: bucket.to_string(),
        prefix: segments.join("/"),
    })
}

impl fmt::Display for CheckpointLocation {
    /// What [`CheckpointLocation::parse`] reads back as the same location.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A path containing `://` would read back as a scheme: spell it as a file URL.
            CheckpointLocation::Local(p) if p.to_string_lossy().contains("://") => {
                write!(f, "{FILE_SCHEME}{}", p.display())
            }
            CheckpointLocation::Local(p) => write!(f, "{}", p.display()),
            CheckpointLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "{S3_SCHEME}{bucket}"),
            CheckpointLocation::S3 { bucket, prefix } => write!(f, "{S3_SCHEME}{bucket}/{prefix}"),
        }
    }
}

impl FromStr for CheckpointLocation {
    type Err = LocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CheckpointLocation::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn local(p: &str) -> CheckpointLocation {
        CheckpointLocation::Local(PathBuf::from(p))
    }

    #[test]
    fn paths_file_urls_and_s3_parse() {
        let parse = |s| CheckpointLocation::parse(s).unwrap();
        assert_eq!(parse("/data/run"), local("/data/run"));
        assert_eq!(parse("runs/a"), local("runs/a"));
        assert_eq!(parse("file:///data/run"), local("/data/run"));
        assert_eq!(parse("file:///x/a://b"), local("/x/a://b"));
        let s3 = |bucket: &str, prefix: &str| CheckpointLocation::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        };
        assert_eq!(parse("s3://bkt"), s3("bkt", ""));
        assert_eq!(parse("s3://bkt/"), s3("bkt", ""));
        assert_eq!(parse("s3://bkt/models/run-1/"), s3("bkt", "models/run-1"));
        assert_eq!(parse("s3://bkt//models"), s3("bkt", "models"));
        assert!(parse("/data/run").is_local() && !parse("s3://b/p").is_local());
        assert_eq!(parse("s3://b/p").local_path(), None);
    }

    #[test]
    fn other_schemes_and_malformed_locations_are_refused_by_name() {
        for (text, needle) in [
            ("gs://bkt/run", "\"gs://\""),
            ("http://host/run", "\"http://\""),
            ("/data/x://y", "\"/data/x://\""),
            ("s3://", "no bucket"),
            ("s3:///prefix", "no bucket"),
            ("s3://bkt/models/../other", "\"..\""),
            ("s3://bkt/./x", "\".\""),
            ("", "empty path"),
            ("file://", "empty path"),
        ] {
            let e = CheckpointLocation::parse(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn absolute_is_lexical_and_leaves_s3_alone() {
        let rel = local("not-yet/created/../run");
        let abs = rel.absolute();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(abs, CheckpointLocation::Local(cwd.join("not-yet/created/../run")));
        let s3 = CheckpointLocation::parse("s3://b/p").unwrap();
        assert_eq!(s3.absolute(), s3);
    }

    #[test]
    fn reading_needs_a_directory_and_writing_creates_one() {
        let base = std::env::temp_dir().join(format!("gantry-location-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = CheckpointLocation::Local(base.join("a/b"));
        assert!(dir.for_reading().unwrap_err().is_absent());
        let written = dir.for_writing().unwrap();
        assert_eq!(
            written,
            CheckpointLocation::Local(std::fs::canonicalize(base.join("a/b")).unwrap())
        );
        assert_eq!(dir.for_reading().unwrap(), written);
        std::fs::write(base.join("file"), "x").unwrap();
        let file = CheckpointLocation::Local(base.join("file"));
        assert!(matches!(file.for_reading(), Err(LocationError::NotADirectory { .. })));
        let s3 = CheckpointLocation::parse("s3://b/p").unwrap();
        assert_eq!(s3.for_reading().unwrap(), s3);
        let _ = std::fs::remove_dir_all(&base);
    }

    fn any_location() -> impl Strategy<Value = CheckpointLocation> {
        let segment = "[a-zA-Z0-9_.:-]{1,8}".prop_filter("not . or ..", |s| s != "." && s != "..");
        prop_oneof![
            "/?[a-zA-Z0-9_ ./:-]{1,24}".prop_map(|p| CheckpointLocation::Local(PathBuf::from(p))),
            ("[a-z0-9.-]{1,12}", prop::collection::vec(segment, 0..4)).prop_map(|(bucket, segments)| {
                CheckpointLocation::S3 {
                    bucket,
                    prefix: segments.join("/"),
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn display_round_trips(location in any_location()) {
            let shown = location.to_string();
            prop_assert_eq!(CheckpointLocation::parse(&shown).unwrap(), location);
        }

        #[test]
        fn unknown_schemes_never_become_paths(scheme in "[a-z][a-z0-9+.-]{0,6}", rest in "[a-z/]{0,12}") {
            prop_assume!(scheme != "s3" && scheme != "file");
            let text = format!("{scheme}://{rest}");
            let refused = matches!(
                CheckpointLocation::parse(&text),
                Err(LocationError::UnknownScheme { scheme: s, .. }) if s == format!("{scheme}://")
            );
            prop_assert!(refused);
        }
    }
}
