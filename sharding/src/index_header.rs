//! What the two binary index formats share (the `.idx` of [`crate::indexed`], the `.zidx` of
//! [`crate::frames`]): the opening checks (long enough for the fixed header, then the magic
//! bytes) and reading little-endian fields. Each format maps a [`HeaderFault`] to its own
//! typed error, which names the file.

/// Why the start of an index file is not a header of its format.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderFault {
    /// The file is shorter than the fixed header.
    Truncated { needed: u64, got: u64 },
    /// The magic bytes at offset 0 are wrong; `found` is them, escaped for printing.
    BadMagic { found: String },
}

/// Check that `bytes` holds at least `header_len` bytes and begins with `magic` (length
/// first, so a short file is reported as short rather than as a bad magic).
pub(crate) fn check_start(bytes: &[u8], header_len: usize, magic: &[u8]) -> Result<(), HeaderFault> {
    if bytes.len() < header_len {
        return Err(HeaderFault::Truncated {
            needed: header_len as u64,
            got: bytes.len() as u64,
        });
    }
    let start = &bytes[..magic.len()];
    if start != magic {
        return Err(HeaderFault::BadMagic {
            found: String::from_utf8_lossy(start).escape_debug().to_string(),
        });
    }
    Ok(())
}

/// The little-endian u64 at byte `at` (the caller has checked the length).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The little-endian u32 at byte `at` (the caller has checked the length).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian i32 at byte `at` (the caller has checked the length).
pub(crate) fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_file_is_truncated_before_its_magic_is_read() {
        assert_eq!(
            check_start(b"MAG", 8, b"MAGIC"),
            Err(HeaderFault::Truncated { needed: 8, got: 3 })
        );
    }

    #[test]
    fn a_wrong_magic_is_named_escaped() {
        assert_eq!(
            check_start(b"MAGIX\0\0\0\0", 8, b"MAGIC"),
            Err(HeaderFault::BadMagic { found: "MAGIX".into() })
        );
        assert_eq!(
            check_start(b"AB\0CD\0\0\0", 8, b"MAGIC"),
            Err(HeaderFault::BadMagic {
                found: "AB\\0CD".into()
            })
        );
        assert_eq!(check_start(b"MAGIC\0\0\0", 8, b"MAGIC"), Ok(()));
    }

    #[test]
    fn fields_are_little_endian() {
        let b = [0xff, 1, 2, 3, 4, 5, 6, 7, 8, 0xff];
        assert_eq!(u64_at(&b, 1), 0x0807_0605_0403_0201);
        assert_eq!(u32_at(&b, 1), 0x0403_0201);
        assert_eq!(i32_at(&[0xff, 0xff, 0xff, 0xff], 0), -1);
    }
}
