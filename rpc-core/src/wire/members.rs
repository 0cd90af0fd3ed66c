//! Reading the members of a body with serde_json alone: the envelope, then the
//! inner document it carries as a string. Only the members a message kind reads
//! are built; the others are skipped by serde_json (`IgnoredAny`) without allocating.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::{CONTEXT_PREFIX, Keys, MAX_DEPTH, MAX_WANTED};
use crate::error::CodecError;
use crate::target::Version;

/// The top-level members of an inner document that a message kind reads: the
/// values of its keys (by position; a repeated key keeps its last value, as a JSON
/// map would) and, with [`Keys::context`], every `_context_*` member.
#[derive(Debug, PartialEq)]
pub(crate) struct Read {
    /// By the position of their key in [`Keys::names`]; on the stack, not allocated.
    values: [Option<Value>; MAX_WANTED],
    /// The `_context_*` members, by their names without the prefix.
    pub(super) context: Map<String, Value>,
}

impl Read {
    fn new() -> Self {
        Read {
            values: [const { None }; MAX_WANTED],
            context: Map::new(),
        }
    }

    /// The members of `keys` out of a document already read as a map: what the
    /// decoder is compared with.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_members(members: Map<String, Value>, keys: &Keys) -> Self {
        let mut read = Read::new();
        for (key, value) in members {
            if let Some(wanted) = Read::wanted(keys, &key) {
                read.fill(wanted, &key, value);
            }
        }
        read
    }

    pub(super) fn take(&mut self, index: usize) -> Option<Value> {
        self.values.get_mut(index).and_then(Option::take)
    }

    /// Where the member `key` goes, or `None` when it is not read.
    fn wanted(keys: &Keys, key: &str) -> Option<Wanted> {
        match (keys.position)(key) {
            Some(index) => Some(Wanted::At(index)),
            None => (keys.context && key.starts_with(CONTEXT_PREFIX)).then_some(Wanted::Context),
        }
    }

    /// Keeps the value of the member `key`, found [`Wanted`] where it is.
    fn fill(&mut self, wanted: Wanted, key: &str, value: Value) {
        match wanted {
            Wanted::At(index) => {
                if let Some(slot) = self.values.get_mut(index) {
                    *slot = Some(value);
                }
            }
            Wanted::Context => {
                let name = key.get(CONTEXT_PREFIX.len()..).unwrap_or_default();
                self.context.insert(name.to_owned(), value);
            }
        }
    }
}

/// Where a member that is read goes.
#[derive(Clone, Copy)]
enum Wanted {
    /// The value at this position of [`Keys::names`].
    At(usize),
    /// A `_context_` member, into the context.
    Context,
}

/// A JSON string, borrowed from the input when it holds no escapes: the keys of
/// the members, and the envelope's version.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E>(self, text: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// What makes a body an envelope: its version, and the members `keys` wants read
/// from its inner document; both `None` in a bare 1.0 body. The two are read as
/// `#[derive(Deserialize)]` would read them (null is absent, a repeated one is an
/// error, any other member is skipped).
struct Envelope<'a> {
    version: Option<Cow<'a, str>>,
    /// Read into [`EnvelopeFor::read`] as soon as serde_json has unescaped the
    /// string, from its buffer: the inner text is never copied out. Its errors wait
    /// for the version, which may come after it and decides whether it matters.
    inner: Option<serde_json::Result<()>>,
}

/// Reads an [`Envelope`], the members of its inner document into `read`.
struct EnvelopeFor<'r> {
    keys: &'static Keys,
    read: &'r mut Read,
}

impl<'de> DeserializeSeed<'de> for EnvelopeFor<'_> {
    type Value = Envelope<'de>;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeFor<'_> {
    type Value = Envelope<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        // Whether each was present, null or not: a repeated one is refused either way.
        let (mut version, mut inner) = (None, None);
        while let Some(Text(key)) = access.next_key::<Text<'de>>()? {
            match &*key {
                "oslo.version" => {
                    if version.is_some() {
                        return Err(de::Error::duplicate_field("oslo.version"));
                    }
                    version = Some(access.next_value::<Option<Text<'de>>>()?.map(|text| text.0));
                }
                "oslo.message" => {
                    if inner.is_some() {
                        return Err(de::Error::duplicate_field("oslo.message"));
                    }
                    inner = Some(access.next_value_seed(Message {
                        keys: self.keys,
                        read: &mut *self.read,
                    })?);
                }
                _ => access.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        Ok(Envelope {
            version: version.flatten(),
            inner: inner.flatten(),
        })
    }
}

/// The `oslo.message` string, or null: the members `keys` wants, read from it
/// into `read`.
struct Message<'r> {
    keys: &'static Keys,
    read: &'r mut Read,
}

impl<'de> DeserializeSeed<'de> for Message<'_> {
    type Value = Option<serde_json::Result<()>>;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = Option<serde_json::Result<()>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
    fn visit_str<E>(self, inner: &str) -> Result<Self::Value, E> {
        let members = Members {
            keys: self.keys,
            read: self.read,
        };
        Ok(Some(read_all(inner, members)))
    }
}

/// Reads the members of an inner document that [`Keys`] wants into a [`Read`].
struct Members<'r> {
    keys: &'static Keys,
    /// Filled in place: a `Read` returned by value is copied at every step out.
    read: &'r mut Read,
}

impl<'de> DeserializeSeed<'de> for Members<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Members<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        while let Some(Text(key)) = access.next_key::<Text<'de>>()? {
            match Read::wanted(self.keys, &key) {
                // The document is the first level.
                Some(wanted) => {
                    self.read
                        .fill(wanted, &key, access.next_value_seed(Bounded { depth: 1 })?)
                }
                // Skipped without being built, and without recursion: serde_json
                // ignores a value of any depth in a loop.
                None => access.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        Ok(())
    }
}

/// A JSON value built as `serde_json::Value` builds itself, inside a container at
/// `depth`; refused where arrays and objects nest deeper than [`MAX_DEPTH`]
/// (serde_json's own limit, 128, is looser than this format's).
#[derive(Clone, Copy)]
struct Bounded {
    depth: usize,
}

impl Bounded {
    /// The seed for the items of a container opened inside this one's.
    fn deeper<E: de::Error>(self) -> Result<Bounded, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "JSON nests deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(Bounded {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Bounded {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }
    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }
    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }
    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        // What `Value` makes of a float JSON cannot hold (serde_json never gives one).
        Ok(Number::from_f64(value).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }
    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let items = self.deeper()?;
        let mut array = Vec::with_capacity(access.size_hint().unwrap_or(0));
        while let Some(item) = access.next_element_seed(items)? {
            array.push(item);
        }
        Ok(Value::Array(array))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let values = self.deeper()?;
        let mut object = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            object.insert(key, access.next_value_seed(values)?);
        }
        Ok(Value::Object(object))
    }
}

/// Reads all of `text` with `seed`: trailing text is an error.
fn read_all<'de, S: DeserializeSeed<'de>>(text: &'de str, seed: S) -> serde_json::Result<S::Value> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = seed.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Reads the members `keys` wants from a body: the inner document of a 2.0
/// envelope, or a bare 1.0 body as oslo takes any other object.
pub(crate) fn read_members(body: &[u8], keys: &'static Keys) -> Result<Read, CodecError> {
    // Checked once here, so serde_json checks no string again (and none is skipped
    // unchecked).
    let body = std::str::from_utf8(body)
        .map_err(|e| CodecError::new(format!("body is not UTF-8: {e}")))?;
    let mut read = Read::new();
    let envelope = read_all(
        body,
        EnvelopeFor {
            keys,
            read: &mut read,
        },
    )
    .map_err(|e| CodecError::new(format!("body is not a JSON object: {e}")))?;
    if let Envelope {
        version: Some(version),
        inner: Some(inner),
    } = envelope
    {
        let parsed: Version = version
            .parse()
            .map_err(|_| CodecError::new(format!("bad envelope version {version:?}")))?;
        if parsed.major != 2 || parsed.minor > 0 {
            return Err(CodecError::new(format!(
                "unsupported envelope version {version} (this library reads 2.0)"
            )));
        }
        inner.map_err(|e| CodecError::new(format!("oslo.message is not a JSON object: {e}")))?;
        return Ok(read);
    }
    // Not an envelope: oslo takes any other object as an unenveloped 1.0 message
    // (what an `oslo.message` member without a version held is dropped).
    read = Read::new();
    read_all(
        body,
        Members {
            keys,
            read: &mut read,
        },
    )
    .map_err(|e| CodecError::new(format!("body is not a JSON object: {e}")))?;
    Ok(read)
}
