//! A property test over the config parser (issue 14): seeded mutations of the corpus in
//! `tests/corpus/config` and the shipped examples, at the byte level and at the value
//! level. Whatever the text, `Config::from_json` returns (never panics), and an error is
//! one line that says where: a `line L, column C` for JSON syntax, a field name otherwise.

use crate::head_fuzz::{Rng, corpus};
use failover_proxy::config::validated::{Config, Overrides};
use serde_json::{Value, json};

/// Values that have broken parsers: wrong types, extremes, empty and odd strings.
fn hostile_values() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(0.5),
        json!(1e308),
        json!(-1e308),
        json!(4294967296u64),
        json!(u64::MAX),
        json!(""),
        json!(" "),
        json!("\u{0}"),
        json!("x".repeat(10_000)),
        json!("http://"),
        json!("socks5://["),
        json!("127.0.0.1:99999"),
        json!([]),
        json!({}),
        json!([{"base_url": "http://a", "api_key": ""}]),
    ]
}

/// Replaces one value somewhere in `value` (a random path of objects and arrays).
fn replace_somewhere(value: &mut Value, rng: &mut Rng, with: Value) {
    let mut at = value;
    loop {
        let children = match at {
            Value::Object(map) if !map.is_empty() => map.len(),
            Value::Array(items) if !items.is_empty() => items.len(),
            _ => break,
        };
        if rng.below(3) == 0 {
            break;
        }
        let index = rng.below(children);
        at = match at {
            Value::Object(map) => map.values_mut().nth(index).expect("a value"),
            Value::Array(items) => &mut items[index],
            _ => unreachable!(),
        };
    }
    *at = with;
}

fn check(text: &str, case: &str) {
    let parsed = std::panic::catch_unwind(|| {
        Config::from_json(text, &Overrides::default(), &|_| Some("sk-env-key".into()))
    });
    let result = parsed.unwrap_or_else(|_| panic!("{case}: the parser panicked on {text:?}"));
    if let Err(message) = result {
        assert!(
            !message.is_empty() && !message.contains('\n'),
            "{case}: {message:?}"
        );
        assert!(
            message.contains(": "),
            "{case}: the error names no place: {message}"
        );
    }
}

#[test]
fn no_config_text_panics_the_parser_and_every_error_says_where() {
    let mut seeds = corpus("config");
    for example in [
        "config.json",
        "official-plus-relay.json",
        "three-keys-weighted.json",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(example);
        seeds.push((
            example.to_string(),
            std::fs::read(path).expect("an example"),
        ));
    }
    let mut rng = Rng(0x5eed_c0ff_ee15_b00c);
    let hostile = hostile_values();
    for (name, seed) in &seeds {
        let text = String::from_utf8(seed.clone()).expect("UTF-8 seeds");
        check(&text, name);
        let value: Value = serde_json::from_str(&text).expect("seeds are JSON");
        for round in 0..200 {
            let mut mutated = value.clone();
            let with = hostile[rng.below(hostile.len())].clone();
            replace_somewhere(&mut mutated, &mut rng, with);
            check(&mutated.to_string(), &format!("{name} value round {round}"));
            let mut bytes = seed.clone();
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = b"{}[]\",:0-e. \\"[rng.below(13)],
                1 => bytes.insert(at, rng.below(128) as u8),
                _ => drop(bytes.remove(at)),
            }
            check(
                &String::from_utf8_lossy(&bytes),
                &format!("{name} byte round {round}"),
            );
        }
    }
}
