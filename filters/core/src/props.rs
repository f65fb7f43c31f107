//! Decoding of Envoy attribute values as returned by `get_property`.
//!
//! Integers come back as 8-byte little-endian, durations as int64 nanoseconds,
//! strings as raw bytes.

/// An 8-byte little-endian integer attribute; anything else is `None`.
pub fn as_u64(bytes: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

/// An int64 attribute (a duration in ns); negative values clamp to 0.
pub fn as_i64_clamped(bytes: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = bytes.try_into().ok()?;
    Some(i64::from_le_bytes(arr).max(0) as u64)
}

/// A UTF-8 string attribute; invalid UTF-8 is `None`.
pub fn as_str(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_integers_durations_and_strings() {
        assert_eq!(as_u64(&503u64.to_le_bytes()), Some(503));
        assert_eq!(as_u64(&[1, 2, 3]), None);
        assert_eq!(as_i64_clamped(&(-5i64).to_le_bytes()), Some(0));
        assert_eq!(
            as_i64_clamped(&(2_500_000_000i64).to_le_bytes()),
            Some(2_500_000_000)
        );
        assert_eq!(as_i64_clamped(&[1, 2]), None);
        assert_eq!(as_str(b"payment"), Some("payment"));
        assert_eq!(as_str(&[0xff, 0xfe]), None);
    }
}
