//! Opt-in message authentication: HMAC-SHA256 over each message, with a key id so
//! that two keys can be accepted at once while keys rotate, a freshness window and a
//! replay check.
//!
//! A signed body is the envelope the codec wrote with one more member at its end:
//! `"mqrpc.sig": "<key id>:<unix ms>:<hex HMAC>"`. The MAC covers a fixed label, the
//! key id, the timestamp and the unsigned body byte for byte. oslo.messaging ignores
//! envelope members it does not know, so a Python peer still reads signed messages
//! (it does not check them).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, RemoteError};

type HmacSha256 = Hmac<Sha256>;

/// The module of the failure a refused request or reply turns into.
pub const AUTH_FAILURE_MODULE: &str = "mqrpc.auth";
/// The class of that failure; callers see it as [`Error::Authentication`].
pub const AUTH_FAILURE_CLASS: &str = "MessageAuthenticationFailed";

/// What a caller is told when its `what` ("request" or "reply") is refused.
fn refusal_message(what: &str, failure: &AuthFailure) -> String {
    format!("{what} refused: {failure}")
}

/// The failure a server sends a caller whose request it refused.
pub(crate) fn request_refusal(failure: &AuthFailure) -> RemoteError {
    RemoteError::new(AUTH_FAILURE_CLASS, refusal_message("request", failure))
        .with_module(AUTH_FAILURE_MODULE)
}

/// The error of a call whose reply its client refused.
pub(crate) fn reply_refusal(failure: &AuthFailure) -> Error {
    Error::Authentication(refusal_message("reply", failure))
}

/// The error a caller gets for a failure reply that says the server refused its
/// request ([`request_refusal`]); `None` for any other failure.
pub(crate) fn refused_by_server(failure: &RemoteError) -> Option<Error> {
    (failure.module == AUTH_FAILURE_MODULE && failure.class == AUTH_FAILURE_CLASS)
        .then(|| Error::Authentication(failure.message.clone()))
}

/// The envelope member that carries the signature.
const SIG_MEMBER: &[u8] = b",\"mqrpc.sig\":\"";
/// Domain separation: what the MAC is over.
const LABEL: &[u8] = b"mqrpc-hmac-sha256-v1\n";
/// Most signatures a receiver remembers for the replay check; beyond it the oldest
/// are forgotten early (a flood cannot grow memory without bound).
const MAX_REMEMBERED: usize = 1 << 20;
/// Shortest key accepted (bytes).
pub const MIN_KEY_LEN: usize = 16;
/// How far a message's timestamp may be from the receiver's clock by default.
pub const DEFAULT_FRESHNESS: Duration = Duration::from_secs(60);

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthFailure {
    /// The message carries no signature.
    Unsigned,
    /// The signature member is not `key id:timestamp:hex`.
    Malformed,
    /// Signed with a key id this side does not accept.
    UnknownKey(String),
    /// The MAC does not match: another key under that id, or an altered message.
    BadSignature(String),
    /// The timestamp is outside the freshness window (by this much, in ms).
    Stale(u64),
    /// A message with this exact signature was already accepted.
    Replayed,
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthFailure::Unsigned => f.write_str("the message is not signed"),
            AuthFailure::Malformed => f.write_str("the message's signature is malformed"),
            AuthFailure::UnknownKey(id) => {
                write!(
                    f,
                    "the message is signed with key id {id:?}, which is not accepted here"
                )
            }
            AuthFailure::BadSignature(id) => write!(
                f,
                "the signature does not verify with key id {id:?} (a different key, or an altered message)"
            ),
            AuthFailure::Stale(ms) => write!(
                f,
                "the message's timestamp is {ms} ms outside the freshness window"
            ),
            AuthFailure::Replayed => f.write_str("the message was already received (replay)"),
        }
    }
}

/// How many messages were refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejections {
    /// Messages without a signature.
    pub unsigned: u64,
    /// Malformed signatures, unknown key ids and MACs that did not verify.
    pub forged: u64,
    /// Timestamps outside the freshness window.
    pub stale: u64,
    /// Signatures seen before.
    pub replayed: u64,
}

#[derive(Default)]
struct Counters {
    unsigned: AtomicU64,
    forged: AtomicU64,
    stale: AtomicU64,
    replayed: AtomicU64,
}

/// Signatures accepted within the window, oldest first.
#[derive(Default)]
struct Seen {
    order: VecDeque<(Instant, String)>,
    set: HashSet<String>,
}

/// HMAC-SHA256 message authentication for a [`crate::Client`] and a
/// [`crate::Server`]: messages sent are signed with the current key, messages
/// received must carry a valid, fresh, not yet seen signature by an accepted key.
///
/// Clones share their counters and replay memory.
///
/// ```
/// use mqrpc::MessageAuth;
/// let auth = MessageAuth::new("2026-11", b"a shared secret of 32 bytes.....".to_vec())?
///     // The previous key is still accepted while every peer moves to the new one.
///     .accept("2026-10", b"last month's shared secret......".to_vec())?;
/// # Ok::<(), mqrpc::Error>(())
/// ```
#[derive(Clone)]
pub struct MessageAuth {
    key_id: String,
    keys: Arc<HashMap<String, Vec<u8>>>,
    freshness: Duration,
    seen: Arc<Mutex<Seen>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for MessageAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut accepted: Vec<_> = self.keys.keys().collect();
        accepted.sort();
        // Key ids only: the keys never appear.
        f.debug_struct("MessageAuth")
            .field("key_id", &self.key_id)
            .field("accepted", &accepted)
            .field("freshness", &self.freshness)
            .finish()
    }
}

fn check_key(key_id: &str, key: &[u8]) -> Result<(), Error> {
    let id_ok = !key_id.is_empty()
        && key_id.len() <= 64
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !id_ok {
        return Err(Error::InvalidConfig(format!(
            "message auth: key id {key_id:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"
        )));
    }
    if key.len() < MIN_KEY_LEN {
        return Err(Error::InvalidConfig(format!(
            "message auth: key {key_id:?} has {} bytes; at least {MIN_KEY_LEN} are needed",
            key.len()
        )));
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl MessageAuth {
    /// Signs with `key` under `key_id` (1 to 64 of `A-Z a-z 0-9 . _ -`) and accepts
    /// messages signed with it. Keys have at least [`MIN_KEY_LEN`] bytes; 32 random
    /// bytes are right for HMAC-SHA256.
    pub fn new(key_id: impl Into<String>, key: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let (key_id, key) = (key_id.into(), key.into());
        check_key(&key_id, &key)?;
        Ok(MessageAuth {
            keys: Arc::new(HashMap::from([(key_id.clone(), key)])),
            key_id,
            freshness: DEFAULT_FRESHNESS,
            seen: Arc::default(),
            counters: Arc::default(),
        })
    }

    /// Also accepts messages signed with `key` under `key_id` (key rotation).
    pub fn accept(
        mut self,
        key_id: impl Into<String>,
        key: impl Into<Vec<u8>>,
    ) -> Result<Self, Error> {
        let (key_id, key) = (key_id.into(), key.into());
        check_key(&key_id, &key)?;
        if key_id == self.key_id {
            return Err(Error::InvalidConfig(format!(
                "message auth: key id {key_id:?} is already the signing key"
            )));
        }
        Arc::make_mut(&mut self.keys).insert(key_id, key);
        Ok(self)
    }

    /// How far a message's timestamp may be from this side's clock, either way
    /// (default 60 s). Signatures are remembered for twice as long, to refuse replays.
    pub fn freshness(mut self, window: Duration) -> Self {
        self.freshness = window;
        self
    }

    /// The same keys and counters with a replay memory of its own: each server and
    /// each client remembers what it received, so two servers in one process both
    /// take the same fanout cast.
    pub(crate) fn own_memory(&self) -> Self {
        MessageAuth {
            seen: Arc::default(),
            ..self.clone()
        }
    }

    /// The key id messages are signed with.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// How many messages were refused so far, by reason (shared by clones).
    pub fn rejections(&self) -> Rejections {
        let c = &self.counters;
        Rejections {
            unsigned: c.unsigned.load(Ordering::Relaxed),
            forged: c.forged.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
        }
    }

    fn mac(key: &[u8], key_id: &str, ts: u64, unsigned: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(LABEL);
        mac.update(key_id.as_bytes());
        mac.update(b"\n");
        mac.update(ts.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(unsigned);
        mac
    }

    /// Signs a body the codec wrote (a JSON object ending in `}`).
    pub(crate) fn seal(&self, mut body: Vec<u8>) -> Vec<u8> {
        let ts = now_ms();
        let key = &self.keys[&self.key_id];
        let tag = Self::mac(key, &self.key_id, ts, &body)
            .finalize()
            .into_bytes();
        if body.last() == Some(&b'}') {
            body.pop();
        }
        body.extend_from_slice(SIG_MEMBER);
        body.extend_from_slice(format!("{}:{ts}:{}\"}}", self.key_id, hex(&tag)).as_bytes());
        body
    }

    /// Checks a received body; counts and returns the reason when it is refused.
    pub(crate) fn open(&self, body: &[u8]) -> Result<(), AuthFailure> {
        let outcome = self.verify(body);
        if let Err(failure) = &outcome {
            let c = &self.counters;
            let counter = match failure {
                AuthFailure::Unsigned => &c.unsigned,
                AuthFailure::Stale(_) => &c.stale,
                AuthFailure::Replayed => &c.replayed,
                _ => &c.forged,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    fn verify(&self, body: &[u8]) -> Result<(), AuthFailure> {
        let at = body
            .windows(SIG_MEMBER.len())
            .rposition(|w| w == SIG_MEMBER)
            .ok_or(AuthFailure::Unsigned)?;
        let rest = &body[at + SIG_MEMBER.len()..];
        let value = rest
            .strip_suffix(b"\"}")
            .and_then(|v| std::str::from_utf8(v).ok())
            .ok_or(AuthFailure::Malformed)?;
        let mut parts = value.splitn(3, ':');
        let (Some(key_id), Some(ts), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(AuthFailure::Malformed);
        };
        // One spelling per signature, or a replay could pass as new: the timestamp in
        // plain decimal without leading zeros, the tag as 64 lower-case hex digits.
        let canonical_ts = !ts.is_empty()
            && ts.bytes().all(|b| b.is_ascii_digit())
            && (ts == "0" || !ts.starts_with('0'));
        let canonical_tag =
            tag.len() == 64 && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical_ts || !canonical_tag {
            return Err(AuthFailure::Malformed);
        }
        let ts: u64 = ts.parse().map_err(|_| AuthFailure::Malformed)?;
        let tag = unhex(tag).ok_or(AuthFailure::Malformed)?;
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| AuthFailure::UnknownKey(key_id.to_owned()))?;
        let mut unsigned = Vec::with_capacity(at + 1);
        unsigned.extend_from_slice(&body[..at]);
        unsigned.push(b'}');
        Self::mac(key, key_id, ts, &unsigned)
            .verify_slice(&tag)
            .map_err(|_| AuthFailure::BadSignature(key_id.to_owned()))?;
        let now = now_ms();
        let window = u64::try_from(self.freshness.as_millis()).unwrap_or(u64::MAX);
        let skew = now.abs_diff(ts);
        if skew > window {
            return Err(AuthFailure::Stale(skew - window));
        }
        self.remember(value)
    }

    /// Records a verified signature; a second sighting within the window is a replay.
    fn remember(&self, signature: &str) -> Result<(), AuthFailure> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let keep = self.freshness.saturating_mul(2);
        while let Some((at, _)) = seen.order.front() {
            if now.duration_since(*at) <= keep && seen.order.len() < MAX_REMEMBERED {
                break;
            }
            if let Some((_, old)) = seen.order.pop_front() {
                seen.set.remove(&old);
            }
        }
        if !seen.set.insert(signature.to_owned()) {
            return Err(AuthFailure::Replayed);
        }
        seen.order.push_back((now, signature.to_owned()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(id: &str, key: &[u8]) -> MessageAuth {
        MessageAuth::new(id, key.to_vec()).expect("valid key")
    }

    const BODY: &[u8] = br#"{"oslo.version":"2.0","oslo.message":"{\"method\":\"x\"}"}"#;

    #[test]
    fn a_sealed_body_opens_once_and_still_decodes() {
        let a = auth("k1", b"0123456789abcdef0123");
        let sealed = a.seal(BODY.to_vec());
        assert!(sealed.starts_with(&BODY[..BODY.len() - 1]));
        crate::wire::decode_request(&sealed).expect("the codec ignores the member");
        assert_eq!(a.open(&sealed), Ok(()));
        assert_eq!(a.open(&sealed), Err(AuthFailure::Replayed));
        assert_eq!(a.rejections().replayed, 1);
    }

    #[test]
    fn wrong_key_unknown_id_altered_unsigned_and_stale_are_refused() {
        let a = auth("k1", b"0123456789abcdef0123");
        let sealed = a.seal(BODY.to_vec());
        let other = auth("k1", b"another key, same id");
        assert_eq!(
            other.open(&sealed),
            Err(AuthFailure::BadSignature("k1".into()))
        );
        let stranger = auth("k2", b"0123456789abcdef0123");
        assert_eq!(
            stranger.open(&sealed),
            Err(AuthFailure::UnknownKey("k1".into()))
        );
        let altered = String::from_utf8(sealed.clone())
            .expect("utf8")
            .replace("method", "methoc");
        assert!(matches!(
            a.open(altered.as_bytes()),
            Err(AuthFailure::BadSignature(_))
        ));
        assert_eq!(a.open(BODY), Err(AuthFailure::Unsigned));
        let strict = a.clone().freshness(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(strict.open(&sealed), Err(AuthFailure::Stale(_))));
        let r = a.rejections();
        assert_eq!((r.unsigned, r.forged, r.stale), (1, 1, 1));
    }

    #[test]
    fn another_spelling_of_a_signature_is_not_a_new_message() {
        let a = auth("k1", b"0123456789abcdef0123");
        let sealed = String::from_utf8(a.seal(BODY.to_vec())).expect("utf8");
        assert_eq!(a.open(sealed.as_bytes()), Ok(()));
        let (head, sig) = sealed.rsplit_once("\"mqrpc.sig\":\"").expect("signed");
        let (ts, tag) = sig
            .strip_prefix("k1:")
            .and_then(|rest| rest.split_once(':'))
            .expect("parts");
        for variant in [
            format!("k1:0{ts}:{tag}"),
            format!("k1:+{ts}:{tag}"),
            format!("k1:{ts}:{}", tag.to_uppercase()),
        ] {
            let respelled = format!("{head}\"mqrpc.sig\":\"{variant}");
            assert_eq!(
                a.open(respelled.as_bytes()),
                Err(AuthFailure::Malformed),
                "{variant}"
            );
        }
        assert_eq!(
            a.own_memory().open(sealed.as_bytes()),
            Ok(()),
            "a memory of its own"
        );
    }

    #[test]
    fn two_keys_are_accepted_during_rotation() {
        let old = auth("old", b"the old key 0123456");
        let new = auth("new", b"the new key 0123456")
            .accept("old", b"the old key 0123456".to_vec())
            .expect("second key");
        assert_eq!(new.open(&old.seal(BODY.to_vec())), Ok(()));
        assert_eq!(new.open(&new.seal(BODY.to_vec())), Ok(()));
        assert!(old.open(&new.seal(BODY.to_vec())).is_err());
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert!(MessageAuth::new("", b"0123456789abcdef".to_vec()).is_err());
        assert!(MessageAuth::new("a:b", b"0123456789abcdef".to_vec()).is_err());
        assert!(MessageAuth::new("k", b"short".to_vec()).is_err());
        let a = auth("k1", b"super secret key bytes");
        assert!(!format!("{a:?}").contains("super secret"));
    }
}
