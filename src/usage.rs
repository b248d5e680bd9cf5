//! Token usage: read from answers as they pass, kept per endpoint and model, priced when
//! the config gives prices.
//!
//! A JSON answer's `usage` is read from its body; a stream's from `message_start` (the
//! input side and the cache) and `message_delta` (whose counts are cumulative: the last
//! one replaces, never adds). The `Meter` sees each piece only after it was written to
//! the client, so counting never delays an event; it keeps no more than the line it is
//! in, and only for the two events it reads.

use crate::json_fields::{top_level, value};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Token counts, the four kinds Anthropic bills separately.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .saturating_add(other.cache_creation_input_tokens);
        self.cache_read_input_tokens = self
            .cache_read_input_tokens
            .saturating_add(other.cache_read_input_tokens);
    }

    pub fn total(&self) -> u64 {
        [
            self.input_tokens,
            self.output_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ]
        .iter()
        .fold(0u64, |sum, n| sum.saturating_add(*n))
    }

    /// Each kind with the name Prometheus's `type` label gives it.
    pub fn kinds(&self) -> [(&'static str, u64); 4] {
        [
            ("input", self.input_tokens),
            ("output", self.output_tokens),
            ("cache_creation", self.cache_creation_input_tokens),
            ("cache_read", self.cache_read_input_tokens),
        ]
    }

    /// Overwrites the kinds a `usage` object names (counts in it are totals so far).
    fn update(&mut self, usage: &Map<String, Value>) {
        self.update_with(|name| usage.get(name).and_then(Value::as_u64));
    }

    /// Overwrites each kind `count` gives a count for (non-negative integers only).
    fn update_with(&mut self, count: impl Fn(&str) -> Option<u64>) {
        let fields = [
            ("input_tokens", &mut self.input_tokens),
            ("output_tokens", &mut self.output_tokens),
            (
                "cache_creation_input_tokens",
                &mut self.cache_creation_input_tokens,
            ),
            ("cache_read_input_tokens", &mut self.cache_read_input_tokens),
        ];
        for (name, slot) in fields {
            if let Some(n) = count(name) {
                *slot = n;
            }
        }
    }
}

/// One answer's usage and the model that answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub model: Option<String>,
    pub usage: Usage,
}

/// A streamed JSON body is kept up to this for its `usage`; beyond, it is not counted.
const JSON_CAP: usize = 1024 * 1024;

/// A `message_start` or `message_delta` line is kept up to this; a longer one is skipped.
const LINE_CAP: usize = 64 * 1024;

/// Reads usage from an answer's bytes as they pass.
pub enum Meter {
    Off,
    /// A whole body already read (`feed_whole`).
    Counted(Option<Counted>),
    /// A JSON body, kept up to `JSON_CAP`.
    Json(Vec<u8>),
    Events(Events),
}

impl Meter {
    /// The meter for an answer: an event stream, a JSON body, or nothing to count. A JSON
    /// body declared longer than `JSON_CAP` is not kept at all (it would be given up there).
    pub fn for_answer(sse: bool, json: bool, length: Option<u64>) -> Meter {
        let too_long = length.is_some_and(|n| n > JSON_CAP as u64);
        match (sse, json) {
            (true, _) => Meter::Events(Events::default()),
            (false, true) if too_long => Meter::Off,
            (false, true) => Meter::Json(Vec::new()),
            _ => Meter::Off,
        }
    }

    /// Reads a piece of the body, already written to the client.
    pub fn feed(&mut self, piece: &[u8]) {
        match self {
            Meter::Off | Meter::Counted(_) => {}
            Meter::Json(body) if body.len() + piece.len() > JSON_CAP => *self = Meter::Off,
            Meter::Json(body) => body.extend_from_slice(piece),
            Meter::Events(events) => events.feed(piece),
        }
    }

    /// Reads a body that came whole (read before the commit point), where it lies: a JSON
    /// body of up to 8 MiB is parsed without being copied.
    pub fn feed_whole(&mut self, body: &[u8]) {
        match self {
            Meter::Json(kept) if kept.is_empty() => *self = Meter::Counted(from_json(body)),
            _ => self.feed(body),
        }
    }

    /// What was counted; None when the answer said nothing of its usage.
    pub fn finish(self) -> Option<Counted> {
        match self {
            Meter::Off => None,
            Meter::Counted(counted) => counted,
            Meter::Json(body) => from_json(&body),
            Meter::Events(events) => events.counted,
        }
    }
}

/// The `usage` and `model` of a whole JSON answer (a message).
pub fn from_json(body: &[u8]) -> Option<Counted> {
    let [model, usage] = top_level(body, ["model", "usage"]);
    Counts::read(model, usage).counted()
}

/// The fields of a whole JSON answer that are counted, found by `json_fields` (the
/// content, most of a large answer, is skipped unparsed).
pub struct Counts {
    model: Option<Value>,
    usage: Option<Tokens>,
}

/// A `usage` object's counts, as sent (only non-negative integers count).
#[derive(Deserialize)]
pub struct Tokens {
    input_tokens: Option<Value>,
    output_tokens: Option<Value>,
    cache_creation_input_tokens: Option<Value>,
    cache_read_input_tokens: Option<Value>,
}

impl Counts {
    /// The two fields from their texts, as `json_fields::top_level` found them.
    pub fn read(model: Option<&[u8]>, usage: Option<&[u8]>) -> Counts {
        Counts {
            model: value(model),
            usage: value(usage),
        }
    }

    /// None when the answer has no `usage`.
    pub fn counted(self) -> Option<Counted> {
        let tokens = self.usage?;
        let mut usage = Usage::default();
        usage.update_with(|name| {
            let value = match name {
                "input_tokens" => &tokens.input_tokens,
                "output_tokens" => &tokens.output_tokens,
                "cache_creation_input_tokens" => &tokens.cache_creation_input_tokens,
                "cache_read_input_tokens" => &tokens.cache_read_input_tokens,
                _ => return None,
            };
            value.as_ref().and_then(Value::as_u64)
        });
        let model = self.model.as_ref().and_then(Value::as_str).map(model_name);
        Some(Counted { model, usage })
    }
}

/// Which event the lines being read belong to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Current {
    /// No `event:` line yet: the data's `type` decides.
    Unnamed,
    Start,
    Delta,
    /// An event whose lines are skipped unread.
    Other,
}

/// The event-stream side of the meter: a line scanner that parses only `message_start`
/// and `message_delta` data.
pub struct Events {
    current: Current,
    /// The line being read, when it may be needed; `skipping` when it is not kept.
    line: Vec<u8>,
    skipping: bool,
    /// The line being read has nothing but `\r` so far, kept or not (a blank line ends
    /// an event).
    blank: bool,
    counted: Option<Counted>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            current: Current::Unnamed,
            line: Vec::new(),
            skipping: false,
            blank: true,
            counted: None,
        }
    }
}

impl Events {
    fn feed(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            let end = piece.iter().position(|&b| b == b'\n');
            let (part, rest) = match end {
                Some(i) => (&piece[..i], &piece[i + 1..]),
                None => (piece, &piece[piece.len()..]),
            };
            self.take(part);
            if end.is_some() {
                self.end_line();
            }
            piece = rest;
        }
    }

    /// Part of the current line: kept while the line may matter and fits.
    fn take(&mut self, part: &[u8]) {
        self.blank &= part.iter().all(|&b| b == b'\r');
        if self.skipping {
            return;
        }
        if self.current == Current::Other || self.line.len() + part.len() > LINE_CAP {
            self.line.clear();
            self.skipping = true;
            return;
        }
        self.line.extend_from_slice(part);
    }

    fn end_line(&mut self) {
        if self.blank {
            self.current = Current::Unnamed;
        } else if !self.skipping {
            let line = std::mem::take(&mut self.line);
            self.read_line(line.trim_ascii_end());
            self.line = line;
        }
        self.line.clear();
        self.skipping = false;
        self.blank = true;
    }

    fn read_line(&mut self, line: &[u8]) {
        if let Some(name) = line.strip_prefix(b"event:") {
            self.current = match name.trim_ascii() {
                b"message_start" => Current::Start,
                b"message_delta" => Current::Delta,
                _ => Current::Other,
            };
        } else if let Some(data) = line.strip_prefix(b"data:") {
            self.read_data(data);
        }
    }

    fn read_data(&mut self, data: &[u8]) {
        let mentions = |name: &[u8]| data.windows(name.len()).any(|w| w == name);
        let unnamed = self.current == Current::Unnamed;
        if unnamed && !mentions(b"\"message_start\"") && !mentions(b"\"message_delta\"") {
            return;
        }
        #[derive(Deserialize)]
        struct Data {
            #[serde(rename = "type")]
            kind: Option<String>,
            message: Option<Map<String, Value>>,
            usage: Option<Map<String, Value>>,
        }
        let Ok(data) = serde_json::from_slice::<Data>(data) else {
            return;
        };
        let current = match (self.current, data.kind.as_deref()) {
            (Current::Unnamed, Some("message_start")) => Current::Start,
            (Current::Unnamed, Some("message_delta")) => Current::Delta,
            (current, _) => current,
        };
        match current {
            Current::Start => {
                let counted = self.counted.get_or_insert_with(Counted::default);
                let message = data.message.unwrap_or_default();
                if let Some(model) = message.get("model").and_then(Value::as_str) {
                    counted.model = Some(model_name(model));
                }
                if let Some(Value::Object(usage)) = message.get("usage") {
                    counted.usage.update(usage);
                }
            }
            Current::Delta => {
                let counted = self.counted.get_or_insert_with(Counted::default);
                counted.usage.update(&data.usage.unwrap_or_default());
            }
            _ => {}
        }
    }
}

/// A model name as a label and a key: printable ASCII, at most 64 characters.
fn model_name(model: &str) -> String {
    const LONGEST: usize = 64;
    if model.len() <= LONGEST && !model.is_empty() && model.bytes().all(|b| b.is_ascii_graphic()) {
        return model.to_owned();
    }
    let name: String = model
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(LONGEST)
        .collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

/// An endpoint's usage is kept for at most this many models; the rest count as `other`
/// (a relay naming a new model in every answer must not grow memory or metrics).
const MAX_MODELS: usize = 32;

/// An endpoint's usage by model: since start, and on the current UTC day.
#[derive(Clone, Debug, Default)]
pub struct Book {
    by_model: BTreeMap<String, Usage>,
    day: u64,
    today: BTreeMap<String, Usage>,
}

impl Book {
    /// Adds one answer's usage; `day` is the UTC day number (Unix days) it came on.
    pub fn add(&mut self, model: &str, usage: &Usage, day: u64) {
        let known = self.by_model.contains_key(model) || self.by_model.len() < MAX_MODELS;
        let key = if known { model } else { "other" };
        add_to(&mut self.by_model, key, usage);
        if day != self.day {
            self.day = day;
            self.today.clear();
        }
        add_to(&mut self.today, key, usage);
    }

    pub fn by_model(&self) -> &BTreeMap<String, Usage> {
        &self.by_model
    }

    /// UTC day `day`'s usage by model (none once that day is over).
    pub fn today(&self, day: u64) -> BTreeMap<String, Usage> {
        if day == self.day {
            self.today.clone()
        } else {
            BTreeMap::new()
        }
    }
}

/// Adds `usage` to `model`'s entry; the name is copied only for a model not seen before.
fn add_to(book: &mut BTreeMap<String, Usage>, model: &str, usage: &Usage) {
    match book.get_mut(model) {
        Some(entry) => entry.add(usage),
        None => book.entry(model.to_string()).or_default().add(usage),
    }
}

/// The sum over models.
pub fn total(by_model: &BTreeMap<String, Usage>) -> Usage {
    let mut total = Usage::default();
    by_model.values().for_each(|u| total.add(u));
    total
}

/// The UTC day number (days since 1970-01-01) of `t`: the "today" of usage.
pub fn utc_day(t: std::time::SystemTime) -> u64 {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since.as_secs() / 86_400
}

/// USD per million tokens of each kind, for one model (config `prices`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_write: f64,
    pub cache_read: f64,
}

impl Price {
    pub fn cost(&self, usage: &Usage) -> f64 {
        (usage.input_tokens as f64 * self.input
            + usage.output_tokens as f64 * self.output
            + usage.cache_creation_input_tokens as f64 * self.cache_write
            + usage.cache_read_input_tokens as f64 * self.cache_read)
            / 1e6
    }
}

/// The price of `model`: its own entry, else the longest entry that is a prefix of its
/// name (`claude-sonnet-4` prices `claude-sonnet-4-20250514`).
pub fn price_of<'a>(prices: &'a BTreeMap<String, Price>, model: &str) -> Option<&'a Price> {
    prices.get(model).or_else(|| {
        prices
            .iter()
            .filter(|(name, _)| model.starts_with(name.as_str()))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| price)
    })
}

/// The estimated cost of a book's usage: the sum over the models that have a price, or
/// None when none has.
pub fn cost(prices: &BTreeMap<String, Price>, usage: &BTreeMap<String, Usage>) -> Option<f64> {
    usage
        .iter()
        .filter_map(|(model, u)| Some(price_of(prices, model)?.cost(u)))
        .fold(None, |sum, c| Some(sum.unwrap_or(0.0) + c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":7,\"cache_read_input_tokens\":11,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0}\n\n\
event: ping\ndata: {\"type\": \"ping\"}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"message_delta usage\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn expected() -> Counted {
        Counted {
            model: Some("claude-x".into()),
            usage: Usage {
                input_tokens: 25,
                output_tokens: 15,
                cache_creation_input_tokens: 7,
                cache_read_input_tokens: 11,
            },
        }
    }

    fn metered(pieces: &[&[u8]]) -> Option<Counted> {
        let mut meter = Meter::for_answer(true, false, None);
        pieces.iter().for_each(|p| meter.feed(p));
        meter.finish()
    }

    #[test]
    fn a_stream_counts_message_start_and_the_last_cumulative_delta() {
        assert_eq!(metered(&[STREAM.as_bytes()]), Some(expected()));
    }

    #[test]
    fn pieces_split_anywhere_count_the_same() {
        let bytes = STREAM.as_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(
                metered(&[&bytes[..cut], &bytes[cut..]]),
                Some(expected()),
                "{cut}"
            );
        }
        let bytes_one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(metered(&bytes_one_by_one), Some(expected()));
    }

    #[test]
    fn crlf_lines_and_unnamed_events_count_too() {
        let crlf = STREAM.replace('\n', "\r\n");
        assert_eq!(metered(&[crlf.as_bytes()]), Some(expected()));
        let unnamed: String = STREAM
            .lines()
            .filter(|l| !l.starts_with("event:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(metered(&[unnamed.as_bytes()]), Some(expected()));
    }

    #[test]
    fn a_stream_without_usage_counts_nothing_and_huge_lines_are_skipped() {
        assert_eq!(metered(&[b"event: ping\ndata: {}\n\n"]), None);
        let mut long = b"event: message_start\ndata: {\"pad\":\"".to_vec();
        long.extend(std::iter::repeat_n(b'x', LINE_CAP));
        long.extend_from_slice(b"\"}\n\n");
        let rest = "event: message_delta\ndata: {\"usage\":{\"output_tokens\":3}}\n\n";
        let counted = metered(&[&long, rest.as_bytes()]).unwrap();
        assert_eq!(counted.usage.output_tokens, 3);
        assert_eq!(counted.model, None);
    }

    #[test]
    fn a_json_body_counts_its_usage_and_model() {
        let body = br#"{"id":"m","type":"message","model":"claude-x","content":[{"type":"text","text":"hi"}],
            "usage":{"input_tokens":25,"output_tokens":15,"cache_creation_input_tokens":7,"cache_read_input_tokens":11}}"#;
        let mut meter = Meter::for_answer(false, true, None);
        let (a, b) = body.split_at(40);
        meter.feed(a);
        meter.feed(b);
        assert_eq!(meter.finish(), Some(expected()));
        assert_eq!(
            from_json(br#"{"usage":{"input_tokens":-1,"output_tokens":2.5}}"#)
                .unwrap()
                .usage,
            Usage::default()
        );
        assert_eq!(from_json(b"not json"), None);
        let mut big = Meter::for_answer(false, true, None);
        big.feed(&vec![b' '; JSON_CAP]);
        big.feed(body);
        assert_eq!(big.finish(), None);
        let declared_big = Meter::for_answer(false, true, Some(JSON_CAP as u64 + 1));
        assert!(matches!(declared_big, Meter::Off));
        let declared_small = Meter::for_answer(false, true, Some(body.len() as u64));
        assert!(matches!(declared_small, Meter::Json(_)));
    }

    #[test]
    fn model_names_are_printable_ascii_and_at_most_64_characters() {
        assert_eq!(model_name("claude-sonnet-4-5"), "claude-sonnet-4-5");
        assert_eq!(model_name("a b\n\u{7f}c\u{e9}d"), "abcd");
        assert_eq!(model_name(&"m".repeat(64)), "m".repeat(64));
        assert_eq!(model_name(&"m".repeat(65)), "m".repeat(64));
        assert_eq!(model_name(&format!(" {}", "m".repeat(64))), "m".repeat(64));
        assert_eq!(model_name(""), "unknown");
        assert_eq!(model_name(" \t"), "unknown");
    }

    #[test]
    fn a_book_caps_its_models_and_restarts_the_day() {
        let one = Usage {
            input_tokens: 1,
            ..Usage::default()
        };
        let mut book = Book::default();
        for i in 0..MAX_MODELS + 5 {
            book.add(&format!("m{i}"), &one, 100);
        }
        assert_eq!(book.by_model().len(), MAX_MODELS + 1);
        assert_eq!(book.by_model()["other"].input_tokens, 5);
        assert_eq!(total(book.by_model()).input_tokens, MAX_MODELS as u64 + 5);
        assert_eq!(total(&book.today(100)).input_tokens, MAX_MODELS as u64 + 5);
        book.add("m0", &one, 101);
        assert_eq!(book.today(100), BTreeMap::new());
        assert_eq!(book.today(101), BTreeMap::from([("m0".to_string(), one)]));
        assert_eq!(book.by_model()["m0"].input_tokens, 2);
    }

    #[test]
    fn prices_match_exactly_or_by_the_longest_prefix() {
        let price = |input: f64| Price {
            input,
            output: 10.0,
            cache_write: 1.0,
            cache_read: 0.5,
        };
        let prices = BTreeMap::from([
            ("claude".to_string(), price(1.0)),
            ("claude-sonnet".to_string(), price(3.0)),
            ("claude-sonnet-4-20250514".to_string(), price(4.0)),
        ]);
        assert_eq!(
            price_of(&prices, "claude-sonnet-4-20250514").unwrap().input,
            4.0
        );
        assert_eq!(price_of(&prices, "claude-sonnet-4-5").unwrap().input, 3.0);
        assert_eq!(price_of(&prices, "claude-haiku").unwrap().input, 1.0);
        assert!(price_of(&prices, "gpt").is_none());
        let usage = expected().usage;
        let one = price(3.0).cost(&usage);
        assert!((one - (25.0 * 3.0 + 15.0 * 10.0 + 7.0 + 5.5) / 1e6).abs() < 1e-12);
        let book = BTreeMap::from([("claude-sonnet-x".into(), usage), ("gpt".into(), usage)]);
        assert_eq!(cost(&prices, &book), Some(one));
        assert_eq!(cost(&BTreeMap::new(), &book), None);
    }
}
