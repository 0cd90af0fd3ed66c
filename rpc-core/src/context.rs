//! `Context`: the JSON object that travels with every request (user, project,
//! request id, trace parent, ...). Keys a service does not know pass through untouched.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The request context: a JSON object with string keys.
///
/// On the wire each key `k` becomes a top-level `_context_k` of the request, as
/// oslo.messaging sends it.
///
/// ```
/// use mqrpc::Context;
/// let ctx = Context::new().with("user", "alice").with("request_id", "req-1");
/// assert_eq!(ctx.get_as::<String>("user").as_deref(), Some("alice"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Context(Map<String, Value>);

impl Context {
    /// An empty context.
    pub fn new() -> Self {
        Context(Map::new())
    }

    /// Adds a key (builder style). A value that does not serialize is stored as null.
    pub fn with(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        self.insert(key, value);
        self
    }

    /// Sets a key. A value that does not serialize is stored as null.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.0.insert(key.into(), value);
    }

    /// The raw value of a key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// The value of a key decoded as `T`; `None` when absent or of another shape.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.0.get(key).and_then(|v| T::deserialize(v).ok())
    }

    /// Removes a key and returns its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the context has no key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys and values.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter()
    }

    /// The underlying JSON object.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// Consumes the context into its JSON object.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

impl From<Map<String, Value>> for Context {
    fn from(map: Map<String, Value>) -> Self {
        Context(map)
    }
}
