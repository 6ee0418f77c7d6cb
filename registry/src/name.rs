//! Model references as users write them: `name` (the latest version), `name@3` (version 3),
//! `name@latest` (the same as `name`) and `name@alias`. Pure parsing; whether the model,
//! version or alias exists is [`crate::store::Registry::resolve`]'s business.
//!
//! Names of models and aliases: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]`, not
//! starting with `.` or `-`. An alias name is never all digits (that would read as a version)
//! and never `latest` (reserved for the newest version).

use std::fmt;

pub const MAX_NAME_LEN: usize = 128;
/// The selector that always means the newest version.
pub const LATEST: &str = "latest";

/// Which version of a model a reference means.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// The highest version number.
    Latest,
    Version(u32),
    Alias(String),
}

/// A parsed `name[@selector]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub name: String,
    pub selector: Selector,
}

/// Why a name or reference is invalid; `what` is "model name" or "alias name".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {name:?} is {len} characters long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        what: &'static str,
        name: String,
        len: usize,
    },
    #[error("{what} {name:?} has {ch:?} at position {at}; only letters, digits, '.', '_' and '-' are allowed")]
    BadChar {
        what: &'static str,
        name: String,
        ch: char,
        at: usize,
    },
    #[error("{what} {name:?} starts with {ch:?}; names start with a letter, digit or '_'")]
    BadStart { what: &'static str, name: String, ch: char },
    #[error("alias name {name:?} is all digits, which reads as a version number")]
    AllDigits { name: String },
    #[error("alias name {name:?} is reserved: `@latest` always means the newest version")]
    Reserved { name: String },
    #[error("{reference:?}: nothing after '@' (write name, name@<version> or name@<alias>)")]
    EmptySelector { reference: String },
    #[error("{reference:?}: version {text} is not a number from 1 to {}", u32::MAX)]
    BadVersion { reference: String, text: String },
}

fn check(what: &'static str, name: &str) -> Result<(), NameError> {
    let first = name.chars().next().ok_or(NameError::Empty { what })?;
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            name: name.to_string(),
            len,
        });
    }
    if let Some((at, ch)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar {
            what,
            name: name.to_string(),
            ch,
            at,
        });
    }
    if matches!(first, '.' | '-') {
        return Err(NameError::BadStart {
            what,
            name: name.to_string(),
            ch: first,
        });
    }
    Ok(())
}

/// Check a model name.
pub fn check_model_name(name: &str) -> Result<(), NameError> {
    check("model name", name)
}

/// Check an alias name (model-name rules, not all digits, not `latest`).
pub fn check_alias_name(name: &str) -> Result<(), NameError> {
    check("alias name", name)?;
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NameError::AllDigits { name: name.to_string() });
    }
    if name == LATEST {
        return Err(NameError::Reserved { name: name.to_string() });
    }
    Ok(())
}

impl ModelRef {
    pub fn latest(name: &str) -> ModelRef {
        ModelRef {
            name: name.to_string(),
            selector: Selector::Latest,
        }
    }

    /// Parse `name`, `name@<version>`, `name@latest` or `name@<alias>`.
    pub fn parse(reference: &str) -> Result<ModelRef, NameError> {
        let (name, selector) = match reference.split_once('@') {
            None => (reference, None),
            Some((n, s)) => (n, Some(s)),
        };
        check_model_name(name)?;
        let selector = match selector {
            None => Selector::Latest,
            Some("") => {
                return Err(NameError::EmptySelector {
                    reference: reference.to_string(),
                });
            }
            Some(LATEST) => Selector::Latest,
            Some(s) if s.bytes().all(|b| b.is_ascii_digit()) => match s.parse::<u32>() {
                Ok(v) if v > 0 => Selector::Version(v),
                _ => {
                    return Err(NameError::BadVersion {
                        reference: reference.to_string(),
                        text: s.to_string(),
                    });
                }
            },
            Some(s) => {
                check_alias_name(s)?;
                Selector::Alias(s.to_string())
            }
        };
        Ok(ModelRef {
            name: name.to_string(),
            selector,
        })
    }
}

impl std::str::FromStr for ModelRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<ModelRef, NameError> {
        ModelRef::parse(s)
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Latest => write!(f, "{}", self.name),
            Selector::Version(v) => write!(f, "{}@{v}", self.name),
            Selector::Alias(a) => write!(f, "{}@{a}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(name: &str, selector: Selector) -> ModelRef {
        ModelRef {
            name: name.to_string(),
            selector,
        }
    }

    #[test]
    fn the_three_forms_parse() {
        assert_eq!(ModelRef::parse("gpt-small"), Ok(r("gpt-small", Selector::Latest)));
        assert_eq!(
            ModelRef::parse("gpt-small@latest"),
            Ok(r("gpt-small", Selector::Latest))
        );
        assert_eq!(ModelRef::parse("gpt_2.5@3"), Ok(r("gpt_2.5", Selector::Version(3))));
        assert_eq!(
            ModelRef::parse("m@production"),
            Ok(r("m", Selector::Alias("production".into())))
        );
        assert_eq!(ModelRef::parse("m@v2"), Ok(r("m", Selector::Alias("v2".into()))));
        assert_eq!(
            ModelRef::parse("0m@4294967295"),
            Ok(r("0m", Selector::Version(u32::MAX)))
        );
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        let e = |s: &str| ModelRef::parse(s).unwrap_err();
        assert_eq!(e(""), NameError::Empty { what: "model name" });
        assert_eq!(e("@prod"), NameError::Empty { what: "model name" });
        assert!(matches!(e("m@"), NameError::EmptySelector { .. }));
        assert!(matches!(e("m@0"), NameError::BadVersion { .. }));
        assert!(matches!(e("m@4294967296"), NameError::BadVersion { .. }));
        assert!(matches!(e(".hidden"), NameError::BadStart { ch: '.', .. }));
        assert!(matches!(e("-x"), NameError::BadStart { ch: '-', .. }));
        assert!(matches!(e("m@-x"), NameError::BadStart { what: "alias name", .. }));
        assert!(matches!(e("a/b"), NameError::BadChar { ch: '/', at: 1, .. }));
        assert!(matches!(e("m@a@b"), NameError::BadChar { ch: '@', at: 1, .. }));
        assert!(matches!(e("mö"), NameError::BadChar { ch: 'ö', at: 1, .. }));
        assert!(matches!(e(&"x".repeat(129)), NameError::TooLong { len: 129, .. }));
        assert!(ModelRef::parse(&"x".repeat(128)).is_ok());
        let msg = e("a b").to_string();
        assert!(msg.contains("model name \"a b\"") && msg.contains("' '"), "{msg}");
    }

    #[test]
    fn alias_names_are_not_versions_or_latest() {
        assert!(check_alias_name("canary").is_ok());
        assert!(check_alias_name("2024-01").is_ok());
        assert_eq!(
            check_alias_name("123"),
            Err(NameError::AllDigits { name: "123".into() })
        );
        assert_eq!(
            check_alias_name("latest"),
            Err(NameError::Reserved { name: "latest".into() })
        );
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_][A-Za-z0-9._-]{0,30}"
    }

    fn model_ref() -> impl Strategy<Value = ModelRef> {
        let selector = prop_oneof![
            Just(Selector::Latest),
            (1u32..=u32::MAX).prop_map(Selector::Version),
            name()
                .prop_filter("alias rules", |a| check_alias_name(a).is_ok())
                .prop_map(Selector::Alias),
        ];
        (name(), selector).prop_map(|(name, selector)| ModelRef { name, selector })
    }

    proptest! {
        #[test]
        fn parse_inverts_display(x in model_ref()) {
            prop_assert_eq!(ModelRef::parse(&x.to_string()), Ok(x));
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
            if let Ok(x) = ModelRef::parse(&s) {
                prop_assert!(check_model_name(&x.name).is_ok());
            }
        }

        #[test]
        fn near_miss_text_never_panics(s in "[A-Za-z0-9._@-]{0,140}") {
            let _ = ModelRef::parse(&s);
        }
    }
}
