//! Transaction ids and the headers that carry them (protocol v1).

use crate::rng::mix;
use std::fmt;

pub const TXN_HEADER: &str = "x-txmesh-txn";
pub const DEADLINE_HEADER: &str = "x-txmesh-deadline";
pub const OUTCOME_HEADER: &str = "x-txmesh-outcome";
pub const BAGGAGE_HEADER: &str = "baggage";
pub const BAGGAGE_KEY: &str = "txmesh.txn";

/// A transaction id: 128 bits, written as exactly 32 lowercase hex chars, not all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId([u8; 16]);

/// Bytes 6..8 of an id that carries its deadline (see [`TxnId::mint`]).
const DEADLINE_MARK: [u8; 2] = [0x74, 0x78];

impl TxnId {
    /// From 16 bytes; `None` for all zero (not a valid id).
    pub fn from_bytes(b: [u8; 16]) -> Option<Self> {
        (b != [0; 16]).then_some(Self(b))
    }

    /// A new transaction's id: its deadline (unix ms, 48 bits, big-endian)
    /// in bytes 0..6, the mark `7478` in bytes 6..8, and 64 random bits
    /// (all 16 bytes of `random` folded in). The deadline travels with the
    /// id, so a sidecar that never saw the transaction knows when it may
    /// resolve it, without trusting anyone's `x-txmesh-deadline`.
    pub fn mint(deadline_ms: u64, random: [u8; 16]) -> Self {
        let mut b = [0u8; 16];
        let d = deadline_ms.min((1 << 48) - 1).to_be_bytes();
        for (o, v) in b.iter_mut().zip(d.iter().skip(2)) {
            *o = *v;
        }
        for (o, v) in b.iter_mut().skip(6).zip(DEADLINE_MARK) {
            *o = v;
        }
        let half = |range: std::ops::Range<usize>| {
            let mut h = [0u8; 8];
            h.copy_from_slice(random.get(range).unwrap_or(&[0; 8]));
            u64::from_le_bytes(h)
        };
        let tail = mix(half(0..8)) ^ half(8..16);
        for (o, v) in b.iter_mut().skip(8).zip(tail.to_le_bytes()) {
            *o = v;
        }
        Self(b)
    }

    /// The deadline a minted id carries; `None` for ids not minted by
    /// [`TxnId::mint`] (made up by an app, or from an older txmesh: their
    /// bytes 6..8 are the mark with probability 2⁻¹⁶).
    pub fn deadline_ms(&self) -> Option<u64> {
        if self.0.get(6..8) != Some(&DEADLINE_MARK[..]) {
            return None;
        }
        let mut d = [0u8; 8];
        for (o, v) in d.iter_mut().skip(2).zip(self.0.iter()) {
            *o = *v;
        }
        Some(u64::from_be_bytes(d))
    }

    pub fn parse(s: &[u8]) -> Result<Self, String> {
        if s.len() != 32 {
            return Err(format!(
                "transaction id must be 32 lowercase hex characters, got {} bytes",
                s.len()
            ));
        }
        let mut out = [0u8; 16];
        for (i, pair) in s.chunks(2).enumerate() {
            let hi = hex_val(pair.first().copied())?;
            let lo = hex_val(pair.get(1).copied())?;
            if let Some(o) = out.get_mut(i) {
                *o = (hi << 4) | lo;
            }
        }
        Self::from_bytes(out).ok_or_else(|| "transaction id must not be all zero".to_string())
    }

    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Two independent bucket hashes. A minted id's first half is its
    /// deadline and mark (shared by transactions begun together), so both
    /// hashes mix the whole id.
    pub fn hashes(&self) -> (u64, u64) {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(self.0.get(..8).unwrap_or(&[0; 8]));
        b.copy_from_slice(self.0.get(8..).unwrap_or(&[0; 8]));
        let (hi, lo) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
        (mix(lo ^ mix(hi)), mix(hi ^ mix(lo ^ 0x9e37_79b9_7f4a_7c15)))
    }
}

fn hex_val(c: Option<u8>) -> Result<u8, String> {
    match c {
        Some(c @ b'0'..=b'9') => Ok(c - b'0'),
        Some(c @ b'a'..=b'f') => Ok(c - b'a' + 10),
        _ => Err("transaction id must be 32 lowercase hex characters".to_string()),
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxnId({self})")
    }
}

/// What a request says about its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnHeader {
    Absent,
    /// `x-txmesh-txn: new`: please begin one.
    New,
    Id(TxnId),
}

/// Reads the transaction from `x-txmesh-txn` and/or the W3C `baggage` member
/// `txmesh.txn`. Both present and different is an error.
pub fn read_txn(header: Option<&[u8]>, baggage: Option<&[u8]>) -> Result<TxnHeader, String> {
    let from_header = match header {
        None => None,
        Some(b"new") => Some(TxnHeader::New),
        Some(v) => Some(TxnHeader::Id(
            TxnId::parse(v).map_err(|e| format!("invalid {TXN_HEADER}: {e}"))?,
        )),
    };
    let from_baggage = match baggage.and_then(baggage_member) {
        None => None,
        Some(v) => {
            Some(TxnHeader::Id(TxnId::parse(v).map_err(|e| {
                format!("invalid baggage member {BAGGAGE_KEY}: {e}")
            })?))
        }
    };
    match (from_header, from_baggage) {
        (Some(h), Some(b)) if h != b => Err(format!(
            "{TXN_HEADER} and baggage member {BAGGAGE_KEY} name different transactions"
        )),
        (Some(h), _) => Ok(h),
        (None, Some(b)) => Ok(b),
        (None, None) => Ok(TxnHeader::Absent),
    }
}

/// The value of the `txmesh.txn` member of a W3C baggage header
/// (`key=value;props, key2=value2`), whitespace trimmed, properties dropped.
fn baggage_member(baggage: &[u8]) -> Option<&[u8]> {
    baggage.split(|&b| b == b',').find_map(|member| {
        let member = member.split(|&b| b == b';').next()?;
        let eq = member.iter().position(|&b| b == b'=')?;
        let key = trim(member.get(..eq)?);
        (key == BAGGAGE_KEY.as_bytes()).then(|| trim(member.get(eq + 1..).unwrap_or(&[])))
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or(&[])
}

/// `x-txmesh-deadline`: unix epoch milliseconds, decimal digits only.
pub fn parse_deadline(v: &[u8]) -> Result<u64, String> {
    if v.is_empty() || v.len() > 15 || !v.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "invalid {DEADLINE_HEADER}: must be unix epoch milliseconds (decimal digits)"
        ));
    }
    Ok(v.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')))
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id(traceparent: &[u8]) -> Option<String> {
    let mut parts = traceparent.split(|&b| b == b'-');
    let _version = parts.next()?;
    let id = parts.next()?;
    (id.len() == 32 && id.iter().all(|c| c.is_ascii_hexdigit()) && id.iter().any(|&c| c != b'0'))
        .then(|| String::from_utf8_lossy(id).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0af7651916cd43dd8448eb211c80319c";

    #[test]
    fn parses_ids() {
        let id = TxnId::parse(ID.as_bytes()).unwrap();
        assert_eq!(id.to_string(), ID);
        assert!(TxnId::parse(b"0AF7651916CD43DD8448EB211C80319C").is_err());
        assert!(TxnId::parse(b"0af7651916cd43dd8448eb211c80319").is_err());
        assert!(TxnId::parse(b"0af7651916cd43dd8448eb211c80319c0").is_err());
        assert!(TxnId::parse(&[0xff; 32]).is_err());
        assert_eq!(
            TxnId::parse(&[b'0'; 32]).unwrap_err(),
            "transaction id must not be all zero"
        );
        assert!(TxnId::from_bytes([0; 16]).is_none());
    }

    #[test]
    fn a_minted_id_carries_its_deadline() {
        let d = 1_767_225_600_123;
        let id = TxnId::mint(d, [7; 16]);
        assert_eq!(id.deadline_ms(), Some(d));
        assert_eq!(&id.to_string()[..16], "019b76daa87b7478");
        // Round trip through the wire form.
        let back = TxnId::parse(id.to_string().as_bytes()).unwrap();
        assert_eq!(back.deadline_ms(), Some(d));
        // All of the random bytes count: two draws differing anywhere differ.
        let mut r = [7; 16];
        r[0] = 8;
        assert_ne!(TxnId::mint(d, r), id);
        r = [7; 16];
        r[15] = 8;
        assert_ne!(TxnId::mint(d, r), id);
        // Ids not minted here carry no deadline (whatever their first bytes say).
        assert_eq!(TxnId::parse(ID.as_bytes()).unwrap().deadline_ms(), None);
        // Begun together, two ids still land in different buckets.
        let (a, b) = (TxnId::mint(d, [1; 16]), TxnId::mint(d, [2; 16]));
        assert_ne!(a.hashes().0 % 1024, b.hashes().0 % 1024);
        assert_ne!(a.hashes().0, a.hashes().1);
    }

    #[test]
    fn reads_header_and_baggage() {
        let id = TxnHeader::Id(TxnId::parse(ID.as_bytes()).unwrap());
        assert_eq!(read_txn(None, None).unwrap(), TxnHeader::Absent);
        assert_eq!(read_txn(Some(b"new"), None).unwrap(), TxnHeader::New);
        assert_eq!(read_txn(Some(ID.as_bytes()), None).unwrap(), id);
        let bag = format!("userId=alice, txmesh.txn = {ID} ;prop=1,x=y");
        assert_eq!(read_txn(None, Some(bag.as_bytes())).unwrap(), id);
        assert_eq!(
            read_txn(Some(ID.as_bytes()), Some(bag.as_bytes())).unwrap(),
            id
        );
        assert_eq!(read_txn(None, Some(b"a=b,c=d")).unwrap(), TxnHeader::Absent);
        let other = "1af7651916cd43dd8448eb211c80319c";
        let e = read_txn(Some(other.as_bytes()), Some(bag.as_bytes())).unwrap_err();
        assert!(e.contains("different transactions"), "{e}");
        let e = read_txn(Some(b"NEW"), None).unwrap_err();
        assert!(e.starts_with("invalid x-txmesh-txn"), "{e}");
        let e = read_txn(None, Some(b"txmesh.txn=zz")).unwrap_err();
        assert!(e.starts_with("invalid baggage member txmesh.txn"), "{e}");
    }

    #[test]
    fn parses_deadlines_and_trace_ids() {
        assert_eq!(parse_deadline(b"1700000000000").unwrap(), 1_700_000_000_000);
        assert!(parse_deadline(b"").is_err());
        assert!(parse_deadline(b"-5").is_err());
        assert!(parse_deadline(b"1e9").is_err());
        assert!(parse_deadline(b"9999999999999999999999").is_err());
        assert_eq!(
            trace_id(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id(b"garbage"), None);
    }
}
