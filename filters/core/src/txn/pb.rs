//! The gRPC participant control service's messages (`txmesh.v1`,
//! `proto/txmesh/v1/participant.proto`), derived by hand with `prost` so the
//! filter builds without `protoc`; a test checks the field numbers against
//! the shipped `.proto`.

use prost::Message;

/// The service's full name, as in `/txmesh.v1.Participant/Prepare`.
pub const SERVICE: &str = "txmesh.v1.Participant";

#[derive(Clone, PartialEq, prost::Message)]
pub struct PrepareRequest {
    #[prost(string, tag = "1")]
    pub txn: String,
    #[prost(uint64, tag = "2")]
    pub deadline_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Vote {
    Unspecified = 0,
    Commit = 1,
    ReadOnly = 2,
    Abort = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PrepareResponse {
    #[prost(enumeration = "Vote", tag = "1")]
    pub vote: i32,
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// `CommitRequest` and `AbortRequest` (the same one field).
#[derive(Clone, PartialEq, prost::Message)]
pub struct FinishRequest {
    #[prost(string, tag = "1")]
    pub txn: String,
}

/// A control call's request message: `method` is `Prepare`, `Commit` or
/// `Abort`.
pub fn request(method: ControlMethod, txn: &str, deadline_ms: u64) -> Vec<u8> {
    match method {
        ControlMethod::Prepare => PrepareRequest {
            txn: txn.to_string(),
            deadline_ms,
        }
        .encode_to_vec(),
        ControlMethod::Commit | ControlMethod::Abort => FinishRequest {
            txn: txn.to_string(),
        }
        .encode_to_vec(),
    }
}

/// The three methods, from the HTTP control path they stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlMethod {
    Prepare,
    Commit,
    Abort,
}

impl ControlMethod {
    /// `/txmesh/prepare` etc.; None for any other path.
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/txmesh/prepare" => Some(ControlMethod::Prepare),
            "/txmesh/commit" => Some(ControlMethod::Commit),
            "/txmesh/abort" => Some(ControlMethod::Abort),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ControlMethod::Prepare => "Prepare",
            ControlMethod::Commit => "Commit",
            ControlMethod::Abort => "Abort",
        }
    }
}

/// A prepare's answer: the vote and its reason, or why the bytes are not a
/// `PrepareResponse`.
pub fn vote(body: &[u8]) -> Result<(Vote, String), String> {
    let r = PrepareResponse::decode(body)
        .map_err(|_| "the app's PrepareResponse is not valid protobuf".to_string())?;
    let v = Vote::try_from(r.vote).unwrap_or(Vote::Unspecified);
    Ok((v, r.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field numbers and enum values of the shipped `.proto`.
    #[test]
    fn messages_match_the_shipped_proto() {
        let proto = include_str!("../../../../proto/txmesh/v1/participant.proto");
        for line in [
            "package txmesh.v1;",
            "service Participant {",
            "rpc Prepare(PrepareRequest) returns (PrepareResponse);",
            "rpc Commit(CommitRequest) returns (CommitResponse);",
            "rpc Abort(AbortRequest) returns (AbortResponse);",
            "string txn = 1;",
            "uint64 deadline_ms = 2;",
            "Vote vote = 1;",
            "string reason = 2;",
            "VOTE_UNSPECIFIED = 0;",
            "VOTE_COMMIT = 1;",
            "VOTE_READ_ONLY = 2;",
            "VOTE_ABORT = 3;",
        ] {
            assert!(proto.contains(line), "participant.proto lacks {line:?}");
        }
        assert_eq!(SERVICE, "txmesh.v1.Participant");
        // Known bytes: field 1 "t", field 2 varint 300.
        let b = request(ControlMethod::Prepare, "t", 300);
        assert_eq!(b, [0x0a, 1, b't', 0x10, 0xac, 0x02]);
        assert_eq!(request(ControlMethod::Abort, "t", 9), [0x0a, 1, b't']);
    }

    #[test]
    fn votes_decode_and_garbage_is_an_error() {
        let yes = PrepareResponse {
            vote: Vote::Commit as i32,
            reason: String::new(),
        }
        .encode_to_vec();
        assert_eq!(vote(&yes), Ok((Vote::Commit, String::new())));
        let no = PrepareResponse {
            vote: Vote::Abort as i32,
            reason: "sold out".into(),
        }
        .encode_to_vec();
        assert_eq!(vote(&no), Ok((Vote::Abort, "sold out".into())));
        // An empty message is a valid PrepareResponse: no vote.
        assert_eq!(vote(b""), Ok((Vote::Unspecified, String::new())));
        // An unknown enum value is no vote either.
        assert_eq!(vote(&[0x08, 0x09]), Ok((Vote::Unspecified, String::new())));
        for bad in [&[0x0a, 0x05, b'a'][..], &[0xff; 12], &[0x0b]] {
            let e = vote(bad).unwrap_err();
            assert!(e.contains("not valid protobuf"), "{e}");
        }
    }
}
