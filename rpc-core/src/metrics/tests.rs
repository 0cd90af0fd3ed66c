use super::*;
use crate::error::{Error, RemoteError, TimeoutKind, TransportErrorKind};

fn timeout(kind: TimeoutKind) -> Error {
    Error::Timeout {
        msg_id: "m".into(),
        topic: "t".into(),
        broker: "b".into(),
        waited: std::time::Duration::ZERO,
        kind,
    }
}

#[test]
fn every_error_has_a_bounded_outcome() {
    let cases = [
        (Ok(()), "ok"),
        (
            Err(Error::Remote(Box::new(RemoteError::new("ValueError", "x")))),
            "remote",
        ),
        (
            Err(Error::NoSuchMethod { method: "m".into() }),
            "no_such_method",
        ),
        (Err(timeout(TimeoutKind::Reply)), "timeout_reply"),
        (
            Err(timeout(TimeoutKind::CallMonitor)),
            "timeout_call_monitor",
        ),
        (Err(timeout(TimeoutKind::Publish)), "timeout_publish"),
        (
            Err(Error::transport_msg(TransportErrorKind::Refused, "no")),
            "transport",
        ),
        (
            Err(Error::NoResponders {
                address: "a".into(),
            }),
            "no_responders",
        ),
        (Err(Error::Closed), "closed"),
        (Err(Error::InvalidUrl("u".into())), "other"),
    ];
    for (result, label) in cases {
        assert_eq!(Outcome::of(&result).as_str(), label, "{result:?}");
    }
}

#[test]
fn rejections_of_authentication_name_the_failure_not_the_key() {
    use crate::AuthFailure;
    assert_eq!(
        RejectReason::of_auth(&AuthFailure::Unsigned).as_str(),
        "unsigned"
    );
    assert_eq!(
        RejectReason::of_auth(&AuthFailure::Stale(5)).as_str(),
        "stale"
    );
    assert_eq!(
        RejectReason::of_auth(&AuthFailure::Replayed).as_str(),
        "replayed"
    );
    // The key id comes from the network: it never becomes a label value.
    let unknown = AuthFailure::UnknownKey("attacker-chosen".into());
    assert_eq!(RejectReason::of_auth(&unknown).as_str(), "forged");
}
