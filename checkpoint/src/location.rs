//! Where a checkpoint or a dataset lives, parsed once: a local directory (a path or
//! `file://…`) or an S3 prefix (`s3://bucket[/prefix]`). Every place that accepts such a
//! location (the job spec's `checkpoint.dir` and `data.path`, the CLI, the registry and its
//! roots) goes through [`StorageLocation::parse_as`], so they all agree on what is local, what
//! is S3 and what is refused: any other scheme is an error naming it, never a local path that
//! happens to contain `://`. The [`Role`] only words the errors ("bad dataset location …");
//! the grammar is the same for every role.
//!
//! Local paths are kept as written until a caller says what it is about to do:
//! [`StorageLocation::absolute`] (lexically, for specs written before the directory exists
//! and read on other hosts), [`StorageLocation::for_reading`] (resolve symlinks of a
//! directory that must exist: registry roots, registration) or
//! [`StorageLocation::for_writing`] (create it, then resolve).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A checkpoint root or a dataset directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StorageLocation {
    /// A directory on this host, as written (may be relative until made absolute).
    Local(PathBuf),
    /// Objects in `bucket` under `prefix`: key segments joined by `/`, no leading or trailing
    /// slash, no empty, `.` or `..` segment (may be empty: the whole bucket).
    S3 { bucket: String, prefix: String },
}

/// What a location is for: only the wording of errors depends on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Role {
    #[default]
    Checkpoint,
    Dataset,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Checkpoint => "checkpoint",
            Role::Dataset => "dataset",
        })
    }
}

/// Why a string is not a location, or a local one cannot be used as asked.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error(
        "bad {role} location {location:?}: scheme {scheme:?} is not supported (only local paths, file:// and s3://)"
    )]
    UnknownScheme {
        role: Role,
        location: String,
        scheme: String,
    },
    #[error("bad {role} location {location:?}: no bucket name after s3:// (expected s3://bucket[/prefix])")]
    NoBucket { role: Role, location: String },
    #[error("bad {role} location {location:?}: key segment {segment:?} is not allowed (expected s3://bucket[/prefix])")]
    BadKeySegment {
        role: Role,
        location: String,
        segment: String,
    },
    #[error("bad {role} location {location:?}: empty path")]
    EmptyPath { role: Role, location: String },
    #[error("{role} location {location}: {source}")]
    Missing {
        role: Role,
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{role} location {location} is not a directory")]
    NotADirectory { role: Role, location: String },
    #[error("{role} location {location}: cannot create directory: {source}")]
    CannotCreate {
        role: Role,
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

impl StorageLocation {
    /// A checkpoint location: a local path, `file:///abs/path` or `s3://bucket[/prefix]`
    /// ([`StorageLocation::parse_as`] with [`Role::Checkpoint`]).
    pub fn parse(text: &str) -> Result<StorageLocation, LocationError> {
        StorageLocation::parse_as(text, Role::Checkpoint)
    }

    /// A location for `role`: a local path, `file:///abs/path` or `s3://bucket[/prefix]`;
    /// any other `scheme://` is refused naming the scheme.
    pub fn parse_as(text: &str, role: Role) -> Result<StorageLocation, LocationError> {
        if let Some(rest) = text.strip_prefix(S3_SCHEME) {
            return parse_s3(text, rest, role);
        }
        let path = match text.strip_prefix(FILE_SCHEME) {
            Some(path) => path,
            None => match text.split_once("://") {
                Some((scheme, _)) => {
                    return Err(LocationError::UnknownScheme {
                        role,
                        location: text.to_string(),
                        scheme: format!("{scheme}://"),
                    });
                }
                None => text,
            },
        };
        if path.is_empty() {
            return Err(LocationError::EmptyPath {
                role,
                location: text.to_string(),
            });
        }
        Ok(StorageLocation::Local(PathBuf::from(path)))
    }

    pub fn is_local(&self) -> bool {
        matches!(self, StorageLocation::Local(_))
    }

    /// The directory of a local location (`None` for S3).
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            StorageLocation::Local(p) => Some(p),
            StorageLocation::S3 { .. } => None,
        }
    }

    /// How an object or file `key` (relative, `/`-separated) under this location is named to
    /// people: `s3://bucket/prefix/key`, or the local path joined with it.
    pub fn child(&self, key: &str) -> String {
        match self {
            StorageLocation::Local(p) => p.join(key).display().to_string(),
            StorageLocation::S3 { bucket, prefix } if prefix.is_empty() => format!("{S3_SCHEME}{bucket}/{key}"),
            StorageLocation::S3 { bucket, prefix } => format!("{S3_SCHEME}{bucket}/{prefix}/{key}"),
        }
    }

    /// A relative local path made absolute against the current directory, by name only (no
    /// file system access, so it works before the directory exists). S3 is returned as is.
    pub fn absolute(&self) -> StorageLocation {
        match self {
            StorageLocation::Local(p) => StorageLocation::Local(std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            s3 => s3.clone(),
        }
    }

    /// For reading: a local directory must exist and is returned canonical (symlinks
    /// resolved), so a later symlink swap cannot change what was checked. Nothing is created.
    /// Errors speak of a checkpoint location ([`StorageLocation::for_reading_as`]).
    pub fn for_reading(&self) -> Result<StorageLocation, LocationError> {
        self.for_reading_as(Role::Checkpoint)
    }

    /// [`StorageLocation::for_reading`], its errors worded for `role`.
    pub fn for_reading_as(&self, role: Role) -> Result<StorageLocation, LocationError> {
        let StorageLocation::Local(path) = self else {
            return Ok(self.clone());
        };
        let canonical = std::fs::canonicalize(path).map_err(|source| LocationError::Missing {
            role,
            location: self.to_string(),
            source,
        })?;
        if !canonical.is_dir() {
            return Err(LocationError::NotADirectory {
                role,
                location: self.to_string(),
            });
        }
        Ok(StorageLocation::Local(canonical))
    }

    /// For writing: a local directory is created if missing, then returned canonical.
    pub fn for_writing(&self) -> Result<StorageLocation, LocationError> {
        if let StorageLocation::Local(path) = self {
            std::fs::create_dir_all(path).map_err(|source| LocationError::CannotCreate {
                role: Role::Checkpoint,
                location: self.to_string(),
                source,
            })?;
        }
        self.for_reading()
    }
}

fn parse_s3(text: &str, rest: &str, role: Role) -> Result<StorageLocation, LocationError> {
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(LocationError::NoBucket {
            role,
            location: text.to_string(),
        });
    }
    let segments: Vec<&str> = key.split('/').filter(|s| !s.is_empty()).collect();
    if let Some(bad) = segments.iter().find(|s| **s == "." || **s == "..") {
        return Err(LocationError::BadKeySegment {
            role,
            location: text.to_string(),
            segment: bad.to_string(),
        });
    }
    Ok(StorageLocation::S3 {
        bucket: bucket.to_string(),
        prefix: segments.join("/"),
    })
}

impl fmt::Display for StorageLocation {
    /// What [`StorageLocation::parse`] reads back as the same location.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A path containing `://` would read back as a scheme: spell it as a file URL.
            StorageLocation::Local(p) if p.to_string_lossy().contains("://") => {
                write!(f, "{FILE_SCHEME}{}", p.display())
            }
            StorageLocation::Local(p) => write!(f, "{}", p.display()),
            StorageLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "{S3_SCHEME}{bucket}"),
            StorageLocation::S3 { bucket, prefix } => write!(f, "{S3_SCHEME}{bucket}/{prefix}"),
        }
    }
}

impl FromStr for StorageLocation {
    type Err = LocationError;

    /// A checkpoint location ([`StorageLocation::parse`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StorageLocation::parse(s)
    }
}

/// As its [`Display`](fmt::Display) string, so specs and records keep `s3://…` and paths as
/// written.
impl serde::Serialize for StorageLocation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// From a string, through [`StorageLocation::parse_as`] with [`Role::Checkpoint`]; a field
/// with another role uses [`deserialize_as`].
impl<'de> serde::Deserialize<'de> for StorageLocation {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_as(deserializer, Role::Checkpoint)
    }
}

/// A location from a string, its errors worded for `role` (for `#[serde(deserialize_with)]`).
pub fn deserialize_as<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    role: Role,
) -> Result<StorageLocation, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(deserializer)?;
    StorageLocation::parse_as(&text, role).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn local(p: &str) -> StorageLocation {
        StorageLocation::Local(PathBuf::from(p))
    }

    #[test]
    fn paths_file_urls_and_s3_parse() {
        let parse = |s| StorageLocation::parse(s).unwrap();
        assert_eq!(parse("/data/run"), local("/data/run"));
        assert_eq!(parse("runs/a"), local("runs/a"));
        assert_eq!(parse("file:///data/run"), local("/data/run"));
        assert_eq!(parse("file:///x/a://b"), local("/x/a://b"));
        let s3 = |bucket: &str, prefix: &str| StorageLocation::S3 {
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
            let e = StorageLocation::parse(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn the_role_words_the_error_and_nothing_else() {
        let e = StorageLocation::parse_as("ftp://x", Role::Dataset)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad dataset location \"ftp://x\"") && e.contains("\"ftp://\""),
            "{e}"
        );
        let e = StorageLocation::parse("ftp://x").unwrap_err().to_string();
        assert!(e.starts_with("bad checkpoint location"), "{e}");
        for text in ["/d", "rel/d", "file:///d", "s3://b/p/q"] {
            assert_eq!(
                StorageLocation::parse_as(text, Role::Dataset).unwrap(),
                StorageLocation::parse(text).unwrap()
            );
        }
        let e = StorageLocation::Local(PathBuf::from("/no/such/gantry/dir"))
            .for_reading_as(Role::Dataset)
            .unwrap_err();
        assert!(
            e.is_absent() && e.to_string().starts_with("dataset location /no/such"),
            "{e}"
        );
    }

    #[test]
    fn children_are_named_under_the_location() {
        let parse = |s| StorageLocation::parse(s).unwrap();
        assert_eq!(parse("s3://b/ds").child("manifest.json"), "s3://b/ds/manifest.json");
        assert_eq!(parse("s3://b").child("x.idx"), "s3://b/x.idx");
        assert_eq!(parse("/data/ds").child("x.bin"), "/data/ds/x.bin");
    }

    #[test]
    fn serde_is_the_display_string_and_refuses_unknown_schemes() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Field {
            at: StorageLocation,
        }
        let json = serde_json::to_string(&Field {
            at: StorageLocation::parse("s3://b/p").unwrap(),
        })
        .unwrap();
        assert_eq!(json, r#"{"at":"s3://b/p"}"#);
        let back: Field = serde_json::from_str(r#"{"at":"/x/y"}"#).unwrap();
        assert_eq!(back.at, local("/x/y"));
        let e = serde_json::from_str::<Field>(r#"{"at":"gs://b"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"gs://\""), "{e}");
    }

    #[test]
    fn absolute_is_lexical_and_leaves_s3_alone() {
        let rel = local("not-yet/created/../run");
        let abs = rel.absolute();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(abs, StorageLocation::Local(cwd.join("not-yet/created/../run")));
        let s3 = StorageLocation::parse("s3://b/p").unwrap();
        assert_eq!(s3.absolute(), s3);
    }

    #[test]
    fn reading_needs_a_directory_and_writing_creates_one() {
        let base = std::env::temp_dir().join(format!("gantry-location-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = StorageLocation::Local(base.join("a/b"));
        assert!(dir.for_reading().unwrap_err().is_absent());
        let written = dir.for_writing().unwrap();
        assert_eq!(
            written,
            StorageLocation::Local(std::fs::canonicalize(base.join("a/b")).unwrap())
        );
        assert_eq!(dir.for_reading().unwrap(), written);
        std::fs::write(base.join("file"), "x").unwrap();
        let file = StorageLocation::Local(base.join("file"));
        assert!(matches!(file.for_reading(), Err(LocationError::NotADirectory { .. })));
        let s3 = StorageLocation::parse("s3://b/p").unwrap();
        assert_eq!(s3.for_reading().unwrap(), s3);
        let _ = std::fs::remove_dir_all(&base);
    }

    fn any_location() -> impl Strategy<Value = StorageLocation> {
        let segment = "[a-zA-Z0-9_.:-]{1,8}".prop_filter("not . or ..", |s| s != "." && s != "..");
        prop_oneof![
            "/?[a-zA-Z0-9_ ./:-]{1,24}".prop_map(|p| StorageLocation::Local(PathBuf::from(p))),
            ("[a-z0-9.-]{1,12}", prop::collection::vec(segment, 0..4)).prop_map(|(bucket, segments)| {
                StorageLocation::S3 {
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
            prop_assert_eq!(StorageLocation::parse(&shown).unwrap(), location);
        }

        #[test]
        fn unknown_schemes_never_become_paths(scheme in "[a-z][a-z0-9+.-]{0,6}", rest in "[a-z/]{0,12}") {
            prop_assume!(scheme != "s3" && scheme != "file");
            let text = format!("{scheme}://{rest}");
            let refused = matches!(
                StorageLocation::parse(&text),
                Err(LocationError::UnknownScheme { scheme: s, .. }) if s == format!("{scheme}://")
            );
            prop_assert!(refused);
        }
    }
}
