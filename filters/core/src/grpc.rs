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
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("out of stock"), "out of stock");
        assert_eq!(encode_message("100% sure"), "100%25 sure");
        assert_eq!(encode_message("a\r\nb"), "a%0D%0Ab");
        assert_eq!(encode_message("café"), "caf%C3%A9");
    }
}
