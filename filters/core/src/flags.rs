//! Envoy response flags: the `response.flags` attribute is Envoy's legacy
//! bit field (`StreamInfo::legacyResponseFlags()`), one bit per core flag in
//! the order of `CoreResponseFlag`. The short names are those of the access log
//! `%RESPONSE_FLAGS%`.

const SHORT_NAMES: [&str; 30] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
    "UDO",
];

/// Renders the bit field as Envoy's access log does: comma-separated short
/// names, `-` when no flag is set. Unknown bits render as `UNKNOWN`.
pub fn render(bits: u64) -> String {
    if bits == 0 {
        return "-".to_string();
    }
    let mut out = String::new();
    let mut unknown = false;
    for bit in 0..64u32 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        match SHORT_NAMES.get(bit as usize) {
            Some(name) => {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(name);
            }
            None => unknown = true,
        }
    }
    if unknown {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str("UNKNOWN");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_the_access_log() {
        assert_eq!(render(0), "-");
        assert_eq!(render(0x2), "UH");
        assert_eq!(render(0x20), "UF");
        assert_eq!(render(0x100), "NR");
        assert_eq!(render(0x8000), "URX");
        assert_eq!(render(0x10000000), "DR");
        assert_eq!(render(0x2 | 0x8000), "UH,URX");
        assert_eq!(render(1 << 40), "UNKNOWN");
        assert_eq!(render(0x4 | (1 << 40)), "UT,UNKNOWN");
    }
}
