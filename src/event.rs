//! The event model and its validation.
//!
//! A client sends JSON; [`parse_event`] turns one JSON value into a validated
//! [`Event`] or a [`FieldError`] naming the field at fault. Every later part of
//! the system (queue, worker, store, stats) only ever sees validated events, so
//! the rules live here and nowhere else.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Limits from the API contract, in one place so that docs and tests can name them.
pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_PATH_BYTES: usize = 2_048;
pub const MAX_USERID_BYTES: usize = 256;
pub const MAX_EVENT_ID_CHARS: usize = 128;
pub const MAX_PROPS: usize = 32;
pub const MAX_PROP_KEY_CHARS: usize = 128;
pub const MAX_PROP_STRING_BYTES: usize = 1_000;
/// How far in the future a timestamp may be (clock skew between a client and us).
pub const MAX_FUTURE_MS: i64 = 24 * 60 * 60 * 1000;

const KNOWN_FIELDS: [&str; 7] = [
    "site_id",
    "event_type",
    "path",
    "userid",
    "timestamp",
    "event_id",
    "props",
];

/// The name of an engagement event: activity of a visit (how far a page was
/// scrolled, how long it was looked at), never an event of its own in any
/// metric. Reserved: `/event` refuses it as an event type.
pub const ENGAGEMENT: &str = "engagement";

/// Most bytes of a context text field (a referrer is a URL: `MAX_PATH_BYTES`).
pub const MAX_CONTEXT_BYTES: usize = 256;

/// Declares a validated text id: made only by `parse` (or by deserializing,
/// which parses), read as a `&str`.
macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            /// The id, if `s` is a valid one: 1 to
            #[doc = concat!("`", stringify!($max), "`")]
            /// characters, no control characters.
            pub fn parse(s: impl Into<String>) -> Result<Self, FieldError> {
                let s = s.into();
                check_chars(&s, $field, $max)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = FieldError;
            fn try_from(s: String) -> Result<Self, FieldError> {
                Self::parse(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = FieldError;
            fn from_str(s: &str) -> Result<Self, FieldError> {
                Self::parse(s)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

text_id!(
    /// A site's id, as clients send it in `site_id`.
    SiteId,
    "site_id",
    MAX_NAME_CHARS
);
text_id!(
    /// An event's id within its site: the client's `event_id`, or a UUIDv7
    /// made on receipt. With the site, the store's idempotency key.
    EventId,
    "event_id",
    MAX_EVENT_ID_CHARS
);
text_id!(
    /// An event's type (`event_type`; `page_view` for page views).
    EventName,
    "event_type",
    MAX_NAME_CHARS
);

/// One validated event, as it travels through the queue into the store.
///
/// The queue carries it as JSON with exactly these field names. Reading it
/// back validates it as [`parse_event`] does (another program may write
/// into the stream): the ids are their types, and the rest is checked by
/// [`TryFrom<EventFields>`], so an `Event` is valid however it was made.
///
/// Unknown fields are ignored when reading it back, so that during a rolling
/// upgrade an older worker can still read what a newer API wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "EventFields")]
pub struct Event {
    pub id: EventId,
    pub site_id: SiteId,
    pub event_type: EventName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userid: Option<String>,
    /// When the event happened, milliseconds since the Unix epoch (UTC).
    pub ts: i64,
    /// When the API received it, milliseconds since the Unix epoch (`createdAt`).
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<Map<String, Value>>,
    /// The cookieless visitor id ([`crate::visitor`]) of an event sent
    /// without a `userid`; `None` when it has one (the `userid` is then its
    /// visitor, see [`crate::query::visitor_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor: Option<String>,
    /// Where it came from and on what ([`Context`]), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Box<Context>>,
}

/// An [`Event`] as read, before the checks that are not in its field types.
#[derive(Deserialize)]
pub struct EventFields {
    id: EventId,
    site_id: SiteId,
    event_type: EventName,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    userid: Option<String>,
    ts: i64,
    created_at: i64,
    #[serde(default)]
    props: Option<Map<String, Value>>,
    #[serde(default)]
    visitor: Option<String>,
    #[serde(default)]
    ctx: Option<Box<Context>>,
}

/// What is known of where an event came from and on what: found by the API
/// in the request of a browser's event (`/api/event`: the User-Agent, the
/// client's address, the page's URL and referrer), or sent as such by a
/// server (`/event`). Every field is optional; the address itself is never
/// kept. See [`crate::enrich`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Context {
    /// The page's host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The referrer, without scheme and leading `www.`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    /// Where the visitor came from: a known site's name, or the referrer's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_medium: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utm_term: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub browser_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// `Desktop`, `Mobile` or `Tablet`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// ISO 3166-1 alpha-2 code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// A custom event that leaves a one-page visit a bounce (Plausible's
    /// `interactive: false`, e.g. a video that played by itself).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub non_interactive: bool,
    /// Engagement events: how far down the page was scrolled, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scroll_depth: Option<u8>,
    /// Engagement events: how long the page was visible and looked at, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engaged_ms: Option<u64>,
}

/// The text fields of a [`Context`], by their names on `/event`.
macro_rules! context_texts {
    ($m:ident) => {
        $m!(
            hostname,
            referrer,
            source,
            utm_source,
            utm_medium,
            utm_campaign,
            utm_content,
            utm_term,
            browser,
            browser_version,
            os,
            os_version,
            device,
            country
        )
    };
}

impl Context {
    /// The names `/event` accepts for these fields.
    pub const FIELDS: [&'static str; 14] = {
        macro_rules! names {
            ($($f:ident),*) => { [$(stringify!($f)),*] };
        }
        context_texts!(names)
    };

    pub fn is_empty(&self) -> bool {
        *self == Context::default()
    }

    /// A text field by its name in [`Context::FIELDS`].
    pub fn text(&self, field: &str) -> Option<&str> {
        macro_rules! get {
            ($($f:ident),*) => {
                match field {
                    $(stringify!($f) => self.$f.as_deref(),)*
                    _ => None,
                }
            };
        }
        context_texts!(get)
    }

    /// Sets a text field by its name in [`Context::FIELDS`]; `false` for
    /// another name.
    pub fn set_text(&mut self, field: &str, value: Option<String>) -> bool {
        macro_rules! set {
            ($($f:ident),*) => {
                match field {
                    $(stringify!($f) => { self.$f = value; true })*
                    _ => false,
                }
            };
        }
        context_texts!(set)
    }

    /// The same checks as other text: bounded, no control characters.
    fn check(&self) -> Result<(), FieldError> {
        for field in Self::FIELDS {
            if let Some(v) = self.text(field) {
                let max = if field == "referrer" {
                    MAX_PATH_BYTES
                } else {
                    MAX_CONTEXT_BYTES
                };
                check_text(v, field, max)?;
            }
        }
        if self.scroll_depth.is_some_and(|d| d > 100) {
            return Err(FieldError::invalid(
                "scroll_depth",
                "`scroll_depth` is a percentage, 0 to 100",
            ));
        }
        Ok(())
    }
}

impl Event {
    /// Whether it is an engagement event ([`ENGAGEMENT`]): activity of a
    /// visit, not an event in any metric.
    pub fn is_engagement(&self) -> bool {
        self.event_type.as_str() == ENGAGEMENT
    }

    /// Its context, empty when none is known.
    pub fn context(&self) -> &Context {
        static EMPTY: std::sync::LazyLock<Context> = std::sync::LazyLock::new(Context::default);
        self.ctx.as_deref().unwrap_or(&EMPTY)
    }
}

impl TryFrom<EventFields> for Event {
    type Error = FieldError;
    fn try_from(f: EventFields) -> Result<Self, FieldError> {
        let e = Event {
            id: f.id,
            site_id: f.site_id,
            event_type: f.event_type,
            path: f.path,
            userid: f.userid,
            ts: f.ts,
            created_at: f.created_at,
            props: f.props,
            visitor: f.visitor,
            ctx: f.ctx.filter(|c| !c.is_empty()),
        };
        e.check()?;
        Ok(e)
    }
}

impl Event {
    /// The checks that are not in the fields' types: what an event read
    /// from the queue is held to, and one built by the API before it is
    /// queued.
    pub fn check(&self) -> Result<(), FieldError> {
        if let Some(p) = &self.path {
            check_text(p, "path", MAX_PATH_BYTES)?;
        }
        if let Some(u) = &self.userid {
            check_text(u, "userid", MAX_USERID_BYTES)?;
        }
        if self.ts < 0 || self.created_at < 0 {
            return Err(FieldError::invalid("timestamp", "negative timestamp"));
        }
        if let Some(props) = &self.props {
            check_props(props)?;
        }
        if let Some(v) = &self.visitor {
            check_text(v, "visitor", MAX_USERID_BYTES)?;
        }
        if let Some(ctx) = &self.ctx {
            ctx.check()?;
        }
        Ok(())
    }
}

/// Why an event was refused. `code` is stable and machine-readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl FieldError {
    fn new(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    fn missing(field: &str) -> Self {
        Self::new("missing_field", field, format!("`{field}` is required"))
    }

    fn wrong_type(field: &str, expected: &str) -> Self {
        Self::new(
            "invalid_type",
            field,
            format!("`{field}` must be {expected}"),
        )
    }

    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new("invalid_value", field, message)
    }

    /// An error about the whole document rather than one field.
    pub fn document(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FieldError {}

/// The error for a field no event has, with a hint for the usual misspellings.
fn unknown_field(key: &str) -> FieldError {
    let hint = match key.to_ascii_lowercase().as_str() {
        "userid" | "user_id" => " (did you mean `userid`?)",
        "siteid" => " (did you mean `site_id`?)",
        "eventtype" | "type" => " (did you mean `event_type`?)",
        "id" | "eventid" => " (did you mean `event_id`?)",
        "ts" | "time" => " (did you mean `timestamp`?)",
        _ => "",
    };
    FieldError::new(
        "unknown_field",
        &truncate_for_message(key),
        format!("unknown field `{}`{hint}", truncate_for_message(key)),
    )
}

/// Validates one event sent by a client. `now_ms` is the receive time: the
/// default timestamp, `createdAt`, and the reference for "too far in the future".
pub fn parse_event(value: Value, now_ms: i64) -> Result<Event, FieldError> {
    let Value::Object(obj) = value else {
        return Err(FieldError::document(
            "invalid_event",
            "an event must be a JSON object",
        ));
    };
    // One pass over the fields into slots, rather than a lookup per known
    // field: the map hashes every key it is asked for, present or not, and
    // twenty-one removals per event (`swap_remove` and its hashing) were
    // about 8 % of the API's time on batches.
    let mut known: [Option<Value>; KNOWN_FIELDS.len()] = Default::default();
    let mut context: [Option<Value>; Context::FIELDS.len()] = Default::default();
    for (key, value) in obj {
        if let Some(i) = KNOWN_FIELDS.iter().position(|f| *f == key) {
            known[i] = Some(value);
        } else if let Some(i) = Context::FIELDS.iter().position(|f| *f == key) {
            context[i] = Some(value);
        } else {
            // Unknown fields first: a misspelt `userId` must be reported as
            // such, not silently dropped (and not hidden behind some other
            // error).
            return Err(unknown_field(&key));
        }
    }
    let mut take = |field: &str| {
        KNOWN_FIELDS
            .iter()
            .position(|f| *f == field)
            .and_then(|i| known[i].take())
    };
    let site_id = SiteId::parse(name(take("site_id"), "site_id")?)?;
    let event_type = EventName::parse(name(take("event_type"), "event_type")?)?;
    if event_type.as_str() == ENGAGEMENT {
        return Err(FieldError::invalid(
            "event_type",
            "`engagement` is reserved for engagement events (send them to /api/event)",
        ));
    }
    let path = optional_text(take("path"), "path", MAX_PATH_BYTES)?;
    let userid = optional_text(take("userid"), "userid", MAX_USERID_BYTES)?;
    let ts = match take("timestamp") {
        None | Some(Value::Null) => now_ms,
        Some(v) => parse_timestamp(&v, now_ms)?,
    };
    let id = match take("event_id") {
        None | Some(Value::Null) => EventId(uuid::Uuid::now_v7().to_string()),
        Some(Value::String(s)) => EventId::parse(s)?,
        Some(_) => return Err(FieldError::wrong_type("event_id", "a string")),
    };
    let props = match take("props") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => {
            check_props(&map)?;
            Some(map)
        }
        Some(_) => return Err(FieldError::wrong_type("props", "a JSON object")),
    };
    // What a server says of its visitor's request, as the API would have
    // found it from a browser's.
    let mut ctx = Context::default();
    for (field, value) in Context::FIELDS.into_iter().zip(context) {
        let max = if field == "referrer" {
            MAX_PATH_BYTES
        } else {
            MAX_CONTEXT_BYTES
        };
        let value = optional_text(value, field, max)?.filter(|v| !v.is_empty());
        ctx.set_text(field, value);
    }
    Ok(Event {
        id,
        site_id,
        event_type,
        path,
        userid,
        ts,
        created_at: now_ms,
        props,
        visitor: None,
        ctx: (!ctx.is_empty()).then(|| Box::new(ctx)),
    })
}

/// Parses `timestamp`: an RFC 3339 string with an offset (or `Z`), or integer
/// milliseconds since the epoch. Returns milliseconds since the epoch.
pub fn parse_timestamp(value: &Value, now_ms: i64) -> Result<i64, FieldError> {
    let ms = match value {
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|_| {
                FieldError::invalid(
                    "timestamp",
                    "`timestamp` must be an RFC 3339 date-time with an offset, \
                     e.g. 2025-11-23T16:44:31.123Z, or integer milliseconds since the epoch",
                )
            })?
            .with_timezone(&Utc)
            .timestamp_millis(),
        // `1763916271123.0` is the same whole number in JSON; fractions of a
        // millisecond are refused rather than silently rounded.
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            })
            .ok_or_else(|| {
                FieldError::invalid(
                    "timestamp",
                    "`timestamp` as a number must be whole milliseconds since the epoch",
                )
            })?,
        _ => {
            return Err(FieldError::wrong_type(
                "timestamp",
                "an RFC 3339 string or integer milliseconds",
            ));
        }
    };
    if ms < 0 {
        return Err(FieldError::invalid(
            "timestamp",
            "`timestamp` must not be before 1970-01-01T00:00:00Z",
        ));
    }
    if ms > now_ms.saturating_add(MAX_FUTURE_MS) {
        return Err(FieldError::invalid(
            "timestamp",
            "`timestamp` is more than 24 hours in the future",
        ));
    }
    Ok(ms)
}

/// A required string field (checked further by its type's `parse`).
fn name(value: Option<Value>, field: &str) -> Result<String, FieldError> {
    match value {
        None | Some(Value::Null) => Err(FieldError::missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(FieldError::wrong_type(field, "a string")),
    }
}

fn optional_text(
    value: Option<Value>,
    field: &str,
    max_bytes: usize,
) -> Result<Option<String>, FieldError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            check_text(&s, field, max_bytes)?;
            Ok(Some(s))
        }
        Some(_) => Err(FieldError::wrong_type(field, "a string")),
    }
}

/// 1..=max characters, no control characters.
fn check_chars(s: &str, field: &str, max_chars: usize) -> Result<(), FieldError> {
    if s.is_empty() {
        return Err(FieldError::invalid(
            field,
            format!("`{field}` must not be empty"),
        ));
    }
    // At most as many characters as bytes: most ids are checked by length.
    if s.len() > max_chars && s.chars().nth(max_chars).is_some() {
        return Err(FieldError::invalid(
            field,
            format!("`{field}` must be at most {max_chars} characters"),
        ));
    }
    no_control(s, field)
}

/// At most max bytes, no control characters (they break logs and exports).
fn check_text(s: &str, field: &str, max_bytes: usize) -> Result<(), FieldError> {
    if s.len() > max_bytes {
        return Err(FieldError::invalid(
            field,
            format!("`{field}` must be at most {max_bytes} bytes"),
        ));
    }
    no_control(s, field)
}

fn no_control(s: &str, field: &str) -> Result<(), FieldError> {
    if has_control(s) {
        return Err(FieldError::invalid(
            field,
            format!("`{field}` must not contain control characters"),
        ));
    }
    Ok(())
}

/// Whether `s` holds a control character (`char::is_control`: U+0000 to
/// U+001F and U+007F to U+009F), read from its bytes: U+0080 to U+009F are
/// 0xC2 0x80 to 0xC2 0x9F in UTF-8, and 0xC2 is only ever a lead byte.
fn has_control(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c < 0x20 || c == 0x7f || (c == 0xc2 && b.get(i + 1).is_some_and(|n| *n <= 0x9f))
    })
}

pub fn check_props(map: &Map<String, Value>) -> Result<(), FieldError> {
    if map.len() > MAX_PROPS {
        return Err(FieldError::invalid(
            "props",
            format!("`props` may hold at most {MAX_PROPS} keys"),
        ));
    }
    for (key, value) in map {
        // Keys become MongoDB field names: `$` prefixes and dots are operators
        // and paths there, so they are refused for every backend alike.
        if key.is_empty()
            || key.chars().nth(MAX_PROP_KEY_CHARS).is_some()
            || key.starts_with('$')
            || key.contains('.')
            || key.chars().any(char::is_control)
        {
            return Err(FieldError::invalid(
                "props",
                format!(
                    "property name `{}` must be 1-{MAX_PROP_KEY_CHARS} characters, \
                     without `.`, a leading `$` or control characters",
                    truncate_for_message(key)
                ),
            ));
        }
        let field = format!("props.{}", truncate_for_message(key));
        match value {
            Value::String(s) if s.len() > MAX_PROP_STRING_BYTES => {
                return Err(FieldError::invalid(
                    &field,
                    format!("`{field}` must be at most {MAX_PROP_STRING_BYTES} bytes"),
                ));
            }
            // Whole numbers beyond i64 have no exact BSON (or SQLite) type.
            Value::Number(n) if !(n.is_i64() || n.is_f64()) => {
                return Err(FieldError::invalid(
                    &field,
                    format!("`{field}` is too large a whole number (the limit is 2^63-1)"),
                ));
            }
            Value::Array(_) | Value::Object(_) => {
                return Err(FieldError::wrong_type(
                    &field,
                    "a string, number, boolean or null (props are flat)",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Echoing client text back is useful, echoing megabytes is not.
fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_found_from_the_bytes_as_char_is_control_does() {
        let mut samples: Vec<String> = (0u32..0x300)
            .chain([0x2028, 0xfeff, 0x1f600])
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b"))
            .collect();
        samples.extend(["", "é\u{85}", "\u{9f}", "\u{a0}", "plain"].map(str::to_owned));
        for s in samples {
            assert_eq!(has_control(&s), s.chars().any(char::is_control), "{s:?}");
        }
    }
    use serde_json::json;

    const NOW: i64 = 1_763_916_271_123; // 2025-11-23T16:44:31.123Z

    fn ok(v: Value) -> Event {
        parse_event(v, NOW).expect("valid event")
    }

    fn err(v: Value) -> FieldError {
        parse_event(v, NOW).expect_err("invalid event")
    }

    #[test]
    fn the_design_documents_example_is_valid() {
        let e = ok(
            json!({"site_id": "site-001", "event_type": "page_view", "path": "/blog",
                          "userid": "user-115", "timestamp": "2025-11-23T16:44:31.123Z"}),
        );
        assert_eq!(e.site_id, "site-001");
        assert_eq!(e.path.as_deref(), Some("/blog"));
        assert_eq!(e.userid.as_deref(), Some("user-115"));
        assert_eq!(e.ts, NOW);
        assert_eq!(e.created_at, NOW);
        assert!(uuid::Uuid::parse_str(&e.id).is_ok());
    }

    #[test]
    fn required_fields_are_named_when_missing_or_mistyped() {
        let e = err(json!({"event_type": "x"}));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("missing_field", Some("site_id"))
        );
        let e = err(json!({"site_id": "s"}));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("missing_field", Some("event_type"))
        );
        let e = err(json!({"site_id": 5, "event_type": "x"}));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_type", Some("site_id"))
        );
        let e = err(json!({"site_id": "", "event_type": "x"}));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_value", Some("site_id"))
        );
        let e = err(json!({"site_id": "a\nb", "event_type": "x"}));
        assert_eq!(e.field.as_deref(), Some("site_id"));
        let e = err(json!({"site_id": "s", "event_type": "x".repeat(101)}));
        assert_eq!(e.field.as_deref(), Some("event_type"));
        // 100 multi-byte characters are fine: the limit is in characters.
        ok(json!({"site_id": "é".repeat(100), "event_type": "x"}));
        let e = err(json!([1]));
        assert_eq!(e.code, "invalid_event");
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e = err(json!({"site_id": "s", "event_type": "x", "userId": "u"}));
        assert_eq!(e.code, "unknown_field");
        assert_eq!(e.field.as_deref(), Some("userId"));
        assert!(e.message.contains("userid"), "{}", e.message);
        let e = err(json!({"site_id": "s", "event_type": "x", "": 1}));
        assert_eq!(e.code, "unknown_field");
    }

    #[test]
    fn optional_strings_have_byte_limits() {
        ok(
            json!({"site_id": "s", "event_type": "x", "path": "/".repeat(2048), "userid": "u".repeat(256)}),
        );
        let e = err(json!({"site_id": "s", "event_type": "x", "path": "/".repeat(2049)}));
        assert_eq!(e.field.as_deref(), Some("path"));
        let e = err(json!({"site_id": "s", "event_type": "x", "userid": "é".repeat(129)}));
        assert_eq!(e.field.as_deref(), Some("userid"));
        let e = err(json!({"site_id": "s", "event_type": "x", "path": 3}));
        assert_eq!((e.code, e.field.as_deref()), ("invalid_type", Some("path")));
        let e = ok(json!({"site_id": "s", "event_type": "x", "path": null, "userid": null}));
        assert_eq!((e.path, e.userid), (None, None));
    }

    #[test]
    fn timestamps_accept_rfc3339_with_offset_and_epoch_millis() {
        let t = |v: Value| parse_timestamp(&v, NOW);
        assert_eq!(t(json!("2025-11-23T16:44:31.123Z")), Ok(NOW));
        assert_eq!(t(json!("2025-11-23T17:44:31.123+01:00")), Ok(NOW));
        assert_eq!(t(json!(NOW)), Ok(NOW));
        assert_eq!(t(json!(0)), Ok(0));
        assert_eq!(
            t(json!(NOW as f64)),
            Ok(NOW),
            "a whole number written as 1.7e12"
        );
        assert_eq!(t(json!(567.0)), Ok(567));
        for bad in [
            json!(-1.0),
            json!("2025-11-23T16:44:31"), // no offset
            json!("2025-11-23"),
            json!("yesterday"),
            json!(-1),
            json!(1.5),
            json!(1e300),
            json!(18446744073709551615u64),
            json!(true),
            json!({}),
        ] {
            let e = t(bad.clone()).expect_err(&bad.to_string());
            assert_eq!(e.field.as_deref(), Some("timestamp"));
        }
    }

    #[test]
    fn timestamps_more_than_a_day_ahead_are_refused() {
        assert!(parse_timestamp(&json!(NOW + MAX_FUTURE_MS), NOW).is_ok());
        let e = parse_timestamp(&json!(NOW + MAX_FUTURE_MS + 1), NOW).unwrap_err();
        assert!(e.message.contains("future"));
        let e = ok(json!({"site_id": "s", "event_type": "x"}));
        assert_eq!(e.ts, NOW, "absent timestamp means the time of receipt");
    }

    #[test]
    fn event_ids_are_kept_or_made() {
        let e = ok(json!({"site_id": "s", "event_type": "x", "event_id": "abc-1"}));
        assert_eq!(e.id, "abc-1");
        let e = err(json!({"site_id": "s", "event_type": "x", "event_id": ""}));
        assert_eq!(e.field.as_deref(), Some("event_id"));
        let e = err(json!({"site_id": "s", "event_type": "x", "event_id": "x".repeat(129)}));
        assert_eq!(e.field.as_deref(), Some("event_id"));
        let e = err(json!({"site_id": "s", "event_type": "x", "event_id": 7}));
        assert_eq!(e.code, "invalid_type");
        let a = ok(json!({"site_id": "s", "event_type": "x"}));
        let b = ok(json!({"site_id": "s", "event_type": "x"}));
        assert_ne!(a.id, b.id);
        assert!(a.id < b.id, "UUIDv7 ids are time-ordered");
    }

    #[test]
    fn props_are_flat_and_bounded() {
        let e = ok(json!({"site_id": "s", "event_type": "x",
                          "props": {"plan": "pro", "n": 3, "f": 1.5, "b": true, "z": null}}));
        assert_eq!(e.props.map(|p| p.len()), Some(5));
        let e = err(json!({"site_id": "s", "event_type": "x", "props": {"a": {"b": 1}}}));
        assert_eq!(e.field.as_deref(), Some("props.a"));
        let e = err(json!({"site_id": "s", "event_type": "x", "props": {"a": [1]}}));
        assert_eq!(e.field.as_deref(), Some("props.a"));
        let e = err(json!({"site_id": "s", "event_type": "x", "props": {"a": "x".repeat(1001)}}));
        assert_eq!(e.field.as_deref(), Some("props.a"));
        let many: Map<String, Value> = (0..33).map(|i| (format!("k{i}"), json!(i))).collect();
        let e = err(json!({"site_id": "s", "event_type": "x", "props": many}));
        assert_eq!(e.field.as_deref(), Some("props"));
        for key in ["$set", "a.b", ""] {
            let e = err(json!({"site_id": "s", "event_type": "x", "props": {key: 1}}));
            assert_eq!(e.field.as_deref(), Some("props"), "{key}");
        }
        let e = err(json!({"site_id": "s", "event_type": "x", "props": "x"}));
        assert_eq!(e.code, "invalid_type");
        let e = err(json!({"site_id": "s", "event_type": "x", "props": {"big": u64::MAX}}));
        assert_eq!(e.field.as_deref(), Some("props.big"));
        ok(
            json!({"site_id": "s", "event_type": "x", "props": {"max": i64::MAX, "min": i64::MIN, "f": 1e300}}),
        );
    }

    #[test]
    fn queue_json_round_trips_and_rejects_garbage() {
        let e = ok(json!({"site_id": "s", "event_type": "x", "props": {"a": 1}}));
        let text = serde_json::to_string(&e).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
        assert!(serde_json::from_str::<Event>(r#"{"id":"x"}"#).is_err());
        // What another program writes into the queue is held to the same
        // rules as what clients send.
        let mut raw = serde_json::to_value(&e).unwrap();
        for (field, bad) in [
            ("site_id", json!("")),
            ("id", json!("a\u{0}b")),
            ("event_type", json!("x".repeat(MAX_NAME_CHARS + 1))),
            ("path", json!("/a\nb")),
            ("ts", json!(-1)),
            ("props", json!({"$set": 1})),
        ] {
            let good = raw[field].clone();
            raw[field] = bad;
            assert!(
                serde_json::from_value::<Event>(raw.clone()).is_err(),
                "{field}"
            );
            raw[field] = good;
        }
        assert!(serde_json::from_value::<Event>(raw).is_ok());
    }

    /// Property tests: whatever a client sends, parsing ends in an event that
    /// passes the queue-side checks and survives the queue's JSON, or in a
    /// field error with a code and a message — never a panic.
    mod properties {
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        use super::super::*;

        /// Any JSON value, nested a few levels.
        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                ".{0,40}".prop_map(Value::String),
                "[ -~]{0,300}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    prop::collection::btree_map(".{0,12}", inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Objects with the real field names (and a few others) holding
        /// values of any type: the cases that reach past the first check.
        fn event_like() -> impl Strategy<Value = Value> {
            let key = prop_oneof![
                Just("site_id".to_owned()),
                Just("event_type".to_owned()),
                Just("path".to_owned()),
                Just("userid".to_owned()),
                Just("timestamp".to_owned()),
                Just("event_id".to_owned()),
                Just("props".to_owned()),
                ".{0,8}",
            ];
            let value = prop_oneof![
                3 => any_json(),
                2 => "[a-z0-9/._-]{1,20}".prop_map(Value::String),
                1 => (0i64..4_000_000_000_000).prop_map(Value::from),
                1 => "20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-][01][0-9]:[0-5][0-9])"
                    .prop_map(Value::String),
            ];
            let base = Map::from_iter([
                ("site_id".to_owned(), Value::from("s")),
                ("event_type".to_owned(), Value::from("t")),
            ]);
            prop::collection::vec((key, value), 0..8).prop_map(move |pairs| {
                let mut m = base.clone();
                m.extend(pairs);
                Value::Object(m)
            })
        }

        fn check(value: Value) -> Result<(), TestCaseError> {
            let now = 1_764_000_000_000;
            match parse_event(value, now) {
                Ok(e) => {
                    let text = serde_json::to_string(&e)
                        .map_err(|x| TestCaseError::fail(x.to_string()))?;
                    let back: Event = serde_json::from_str(&text)
                        .map_err(|x| TestCaseError::fail(x.to_string()))?;
                    prop_assert_eq!(back, e);
                }
                Err(err) => {
                    prop_assert!(!err.code.is_empty());
                    prop_assert!(!err.message.is_empty());
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn any_json_is_an_event_or_an_error(value in any_json()) {
                check(value)?;
            }

            #[test]
            fn event_like_objects_are_an_event_or_an_error(value in event_like()) {
                check(value)?;
            }

            #[test]
            fn any_bytes_as_a_body_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
                if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
                    check(value)?;
                }
            }
        }
    }
}
