//! gRPC on the wire as the filters see it: whether a response is gRPC, its
//! final status, and text fit for `grpc-message`. A gRPC call's success is
//! its `grpc-status` (in the trailers, or in the headers of a trailers-only
//! answer), never `:status` alone.

/// The response field that carries a gRPC call's status.
pub const STATUS: &str = "grpc-status";
/// The response field that carries a gRPC status's message.
pub const MESSAGE: &str = "grpc-message";

/// The status codes the filters produce or tell apart.
pub const OK: u32 = 0;
pub const UNKNOWN: u32 = 2;
pub const ABORTED: u32 = 10;

/// Whether a `content-type` is gRPC's: `application/grpc`, alone or with a
/// `+format` or parameters (`application/grpc+proto`, `application/grpc;…`).
pub fn is_grpc(content_type: &[u8]) -> bool {
    const BASE: &[u8] = b"application/grpc";
    content_type
        .get(..BASE.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(BASE))
        && matches!(content_type.get(BASE.len()), None | Some(b'+' | b';'))
}

/// A `grpc-status` value: 1–3 ASCII digits (the defined codes are 0–16;
/// others are kept as sent, and are not OK).
pub fn parse_status(v: &[u8]) -> Option<u32> {
    if v.is_empty() || v.len() > 3 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

/// The request field that carries a gRPC call's timeout.
pub const TIMEOUT: &str = "grpc-timeout";

/// A `grpc-timeout` value in ms, rounded up: 1–8 ASCII digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_timeout(v: &[u8]) -> Result<u64, String> {
    let bad = || {
        format!(
            "{TIMEOUT} {:?} is not 1-8 digits and a unit (H, M, S, m, u, n)",
            String::from_utf8_lossy(v)
        )
    };
    let (unit, digits) = v.split_last().ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    let (per_ms, ns_per_unit) = match unit {
        b'H' => (3_600_000, 0),
        b'M' => (60_000, 0),
        b'S' => (1_000, 0),
        b'm' => (1, 0),
        b'u' => (0, 1_000),
        b'n' => (0, 1),
        _ => return Err(bad()),
    };
    Ok(if per_ms > 0 {
        n * per_ms
    } else {
        (n * ns_per_unit).div_ceil(1_000_000)
    })
}

/// `msg` as gRPC's `grpc-message` spells it: bytes outside printable ASCII,
/// and `%`, percent-encoded.
pub fn encode_message(msg: &str) -> String {
    let hex = |n: u8| char::from(if n < 10 { b'0' + n } else { b'A' + n - 10 });
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(hex(b >> 4));
            out.push(hex(b & 0xf));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_told_apart() {
        for yes in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"Application/GRPC;charset=utf-8",
        ] {
            assert!(is_grpc(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"application/grpc-web"[..],
            b"application/grpcx",
            b"application/json",
            b"application/grp",
            b"",
        ] {
            assert!(!is_grpc(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn statuses_are_digits_only() {
        assert_eq!(parse_status(b"0"), Some(OK));
        assert_eq!(parse_status(b"13"), Some(13));
        assert_eq!(parse_status(b"999"), Some(999));
        for bad in [&b""[..], b"1x", b" 0", b"-1", b"1000", b"0x1"] {
            assert_eq!(parse_status(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn timeouts_are_digits_and_a_unit() {
        assert_eq!(parse_timeout(b"1S"), Ok(1_000));
        assert_eq!(parse_timeout(b"500m"), Ok(500));
        assert_eq!(parse_timeout(b"2M"), Ok(120_000));
        assert_eq!(parse_timeout(b"1H"), Ok(3_600_000));
        assert_eq!(parse_timeout(b"99999999H"), Ok(99_999_999 * 3_600_000));
        // Sub-millisecond timeouts round up.
        assert_eq!(parse_timeout(b"1500u"), Ok(2));
        assert_eq!(parse_timeout(b"1n"), Ok(1));
        assert_eq!(parse_timeout(b"0m"), Ok(0));
        for bad in [
            &b""[..],
            b"S",
            b"10",
            b"1s",
            b"123456789S",
            b" 1S",
            b"-1S",
            b"1.5S",
        ] {
            assert!(
                parse_timeout(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("out of stock"), "out of stock");
        assert_eq!(encode_message("100% sure"), "100%25 sure");
        assert_eq!(encode_message("a\r\nb"), "a%0D%0Ab");
        assert_eq!(encode_message("café"), "caf%C3%A9");
    }
}
