//! A call's keyword arguments, encoded once: the caller's arguments are serialized
//! straight into the escaped text the envelope carries, and every attempt's request
//! is written from that text.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::wire;

/// A call's keyword arguments, serialized once, straight into the escaped text the
/// envelope carries (no map of values in between), and written from there into
/// every attempt's body.
pub(super) struct EncodedArgs(pub(super) Vec<u8>);

/// Accepts anything that serializes to a JSON object; `()` means no arguments.
pub(super) fn encode_args<A: Serialize>(args: A) -> Result<EncodedArgs> {
    let text = wire::escaped(&args).map_err(|err| Error::InvalidArguments(err.to_string()))?;
    // The first byte tells what the value is: compact JSON, with a string's quote
    // escaped (`\"`).
    let other = match text.first() {
        Some(b'{') => return Ok(EncodedArgs(text)),
        Some(b'n') => return Ok(EncodedArgs(b"{}".to_vec())),
        Some(b'[') => "an array",
        Some(b'\\') => "a string",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    };
    Err(Error::InvalidArguments(format!(
        "arguments must serialize to a JSON object of keyword arguments, not {other}"
    )))
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::context::Context;
    use crate::wire::{self, Head};

    /// The arguments as a request carrying them decodes them.
    fn decoded_args(args: &EncodedArgs) -> Map<String, Value> {
        let context = Context::new();
        let head = Head::new("m", &context);
        let body = wire::encode_request_with(&head, wire::Args::Escaped(&args.0)).expect("encodes");
        wire::decode_request(&body).expect("decodes").args
    }

    #[test]
    fn arguments_are_encoded_once_as_the_object_they_serialize_to() {
        #[derive(Serialize)]
        struct Typed<'a> {
            text: &'a str,
            n: i64,
            x: f64,
            list: Vec<Option<bool>>,
            nested: Map<String, Value>,
        }
        let nested = json!({"z": 1, "a": [null, "é"]});
        let typed = Typed {
            text: "quote \" backslash \\ tab \t nul \u{0} é 😀 </",
            n: -7,
            x: 0.5,
            list: vec![Some(true), None],
            nested: nested.as_object().cloned().unwrap_or_default(),
        };
        // The same members, whatever serializes them: a typed struct or a `Value`.
        let want = serde_json::to_value(&typed).expect("to_value");
        let encoded = encode_args(&typed).expect("an object");
        assert_eq!(Value::Object(decoded_args(&encoded)), want);
        let from_value = encode_args(&want).expect("an object");
        assert_eq!(Value::Object(decoded_args(&from_value)), want);
        // No arguments: `()`, `None` and an empty map alike.
        for none in [
            encode_args(()),
            encode_args(None::<u8>),
            encode_args(json!({})),
        ] {
            assert!(decoded_args(&none.expect("no arguments")).is_empty());
        }
    }

    #[test]
    fn arguments_that_are_not_an_object_are_refused_by_kind() {
        for (args, kind) in [
            (json!([1]), "an array"),
            (json!("text"), "a string"),
            (json!(3), "a number"),
            (json!(-3.5), "a number"),
            (json!(true), "a boolean"),
            (json!(false), "a boolean"),
        ] {
            match encode_args(&args) {
                Err(Error::InvalidArguments(message)) => {
                    assert!(
                        message.ends_with(&format!("not {kind}")),
                        "{args}: {message}"
                    )
                }
                other => panic!("{args}: {:?}", other.map(|a| a.0)),
            }
        }
        // A map whose keys are not strings does not serialize to JSON at all.
        let mut keyed = std::collections::BTreeMap::new();
        keyed.insert(vec![1u8], 1);
        assert!(matches!(
            encode_args(&keyed),
            Err(Error::InvalidArguments(_))
        ));
    }
}
