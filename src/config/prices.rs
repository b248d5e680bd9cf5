//! `prices`: what a million tokens of each kind cost, per model, so usage can be shown as
//! an estimated cost. Nothing is shipped as fact: every figure comes from the user's
//! config, and an entry whose figures are still `null` (the example config's template)
//! prices nothing.

use crate::usage::Price;
use serde_json::Value;
use std::collections::BTreeMap;

/// The four figures of an entry, in the order `Price` has them.
const FIELDS: [&str; 4] = ["input", "output", "cache_write", "cache_read"];

/// A key that is a comment, not a model (JSON has no comments; `"//"` is the usual stand-in).
pub const COMMENT: &str = "//";

/// The prices by model name (a name may be a prefix: `usage::price_of`).
pub(super) fn validate_prices(
    raw: Option<BTreeMap<String, Value>>,
) -> Result<BTreeMap<String, Price>, String> {
    let mut prices = BTreeMap::new();
    for (model, entry) in raw.unwrap_or_default() {
        if model == COMMENT {
            continue;
        }
        if model.trim().is_empty() {
            return Err("prices: a model name must not be empty".into());
        }
        if let Some(price) = validate_price(&model, &entry)? {
            prices.insert(model, price);
        }
    }
    Ok(prices)
}

/// One entry: all four figures, each USD per million tokens (a number of at least 0) or
/// `null` while unknown (then the entry prices nothing).
fn validate_price(model: &str, entry: &Value) -> Result<Option<Price>, String> {
    let expected = "input, output, cache_write, cache_read (USD per million tokens)";
    let Some(object) = entry.as_object() else {
        return Err(format!("prices.{model}: must be an object with {expected}"));
    };
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "prices.{model}.{unknown}: unknown field; expected {expected}"
        ));
    }
    let mut figures = [0.0; 4];
    let mut unfilled = false;
    for (slot, field) in figures.iter_mut().zip(FIELDS) {
        match object.get(field) {
            None => {
                return Err(format!(
                    "prices.{model}.{field}: missing (USD per million tokens, or null until known)"
                ));
            }
            Some(Value::Null) => unfilled = true,
            Some(value) => {
                *slot = value
                    .as_f64()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .ok_or_else(|| {
                        format!("prices.{model}.{field}: must be a number of at least 0")
                    })?;
            }
        }
    }
    let [input, output, cache_write, cache_read] = figures;
    Ok((!unfilled).then_some(Price {
        input,
        output,
        cache_write,
        cache_read,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prices(value: Value) -> Result<BTreeMap<String, Price>, String> {
        validate_prices(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn entries_are_whole_or_templates() {
        let parsed = prices(json!({
            "//": "fill these in from your provider's price page",
            "claude-sonnet-4": {"input": 3, "output": 15, "cache_write": 3.75, "cache_read": 0.3},
            "claude-opus-4": {"input": null, "output": null, "cache_write": null, "cache_read": null}
        }))
        .unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed["claude-sonnet-4"].cache_write, 3.75);
    }

    #[test]
    fn every_mistake_names_its_field() {
        let cases = [
            (
                json!({"m": {"input": 1, "output": 1, "cache_write": 1}}),
                "prices.m.cache_read: missing",
            ),
            (
                json!({"m": {"input": -1, "output": 1, "cache_write": 1, "cache_read": 1}}),
                "prices.m.input: must be a number",
            ),
            (
                json!({"m": {"input": "3", "output": 1, "cache_write": 1, "cache_read": 1}}),
                "prices.m.input: must be a number",
            ),
            (json!({"m": {"inptu": 1}}), "prices.m.inptu: unknown field"),
            (json!({"m": 3}), "prices.m: must be an object"),
            (json!({" ": {}}), "prices: a model name must not be empty"),
        ];
        for (value, expected) in cases {
            let error = prices(value.clone()).unwrap_err();
            assert!(error.starts_with(expected), "{value}: {error}");
        }
    }
}
