//! The text of a few top-level fields of a JSON object, found without parsing the rest.
//!
//! The proxy reads three fields of every request body (`stream` and the two session keys),
//! and a Claude Code body is 100 KB and more of messages. serde, even skipping what it does
//! not build, looked at every byte of it: a third of the instructions of such a request
//! (callgrind). Here the bytes inside strings, nearly all of a body, are skipped with
//! `memchr` (many bytes at a time), and only the values wanted are handed to serde.
//!
//! The scan follows strings and brackets, not every token: a body broken elsewhere
//! (`[1,,2]`, text after the object) still has its fields read, where a full parse would
//! have failed. Such a body is the upstream's to refuse (it answers 400), and the fields
//! only choose a deadline and an affinity.

/// The raw text of each field of `wanted` at the top level of the object in `body`,
/// whitespace around it included (serde skips it). None for a field that is absent or
/// that appears more than once (a full parse refuses a duplicate field); all None when
/// `body` is not an object or its strings and brackets do not close.
pub fn top_level<'a, const N: usize>(body: &'a [u8], wanted: [&str; N]) -> [Option<&'a [u8]>; N] {
    scan(body, wanted).unwrap_or([None; N])
}

fn scan<'a, const N: usize>(body: &'a [u8], wanted: [&str; N]) -> Option<[Option<&'a [u8]>; N]> {
    let mut found = [None; N];
    let mut seen = [0u32; N];
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' {
        return None;
    }
    let mut depth = 1usize;
    let mut i = start + 1;
    // At depth 1: whether the next string is a key, the wanted field whose value is being
    // read, and where that value began.
    let mut key_next = true;
    let mut field: Option<usize> = None;
    let mut value_start = i;
    loop {
        match *body.get(i)? {
            b'"' => {
                let end = string_end(body, i + 1)?;
                if depth == 1 && key_next {
                    field = position(&body[i..=end], &wanted);
                    key_next = false;
                }
                i = end;
            }
            b':' if depth == 1 => value_start = i + 1,
            b'{' | b'[' => depth += 1,
            b',' | b'}' if depth == 1 => {
                if let Some(k) = field.take() {
                    seen[k] += 1;
                    found[k] = Some(&body[value_start..i]);
                }
                if body[i] == b'}' {
                    break;
                }
                key_next = true;
            }
            // A bracket that closes the object itself (`{"a":1]`) is broken structure.
            b'}' | b']' => depth = depth.checked_sub(1).filter(|&d| d >= 1)?,
            _ => {}
        }
        i += 1;
    }
    for (slot, count) in found.iter_mut().zip(seen) {
        if count > 1 {
            *slot = None;
        }
    }
    Some(found)
}

/// A field's value (its text from `top_level`) read as `T`: None when it is absent,
/// `null`, or not a `T`.
pub fn value<T: serde::de::DeserializeOwned>(text: Option<&[u8]>) -> Option<T> {
    serde_json::from_slice::<Option<T>>(text?).ok().flatten()
}

/// The index of the closing quote of the string whose text starts at `from`.
fn string_end(body: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', body.get(from..)?)?;
        if body[at] == b'"' {
            return Some(at);
        }
        // A backslash and the character it escapes (`\"` included) are skipped together.
        from = at + 2;
    }
}

/// Which of `wanted` the quoted key `key` names. A key with escapes (`"stre\u0061m"`) is
/// decoded first, as a full parse would.
fn position(key: &[u8], wanted: &[&str]) -> Option<usize> {
    let text = &key[1..key.len() - 1];
    if !text.contains(&b'\\') {
        return wanted.iter().position(|w| w.as_bytes() == text);
    }
    let decoded: String = serde_json::from_slice(key).ok()?;
    wanted.iter().position(|w| *w == decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn text(body: &str, wanted: [&str; 2]) -> [Option<String>; 2] {
        top_level(body.as_bytes(), wanted)
            .map(|v| v.map(|v| String::from_utf8_lossy(v).trim().to_string()))
    }

    #[test]
    fn finds_top_level_fields_only_past_strings_escapes_and_nesting() {
        let body = r#" { "a" : {"b":1,"c":[{"b":2}]}, "s":"x\"}],{\\", "b" : [1, "]"] } "#;
        assert_eq!(
            text(body, ["b", "a"]),
            [
                Some(r#"[1, "]"]"#.into()),
                Some(r#"{"b":1,"c":[{"b":2}]}"#.into())
            ]
        );
        assert_eq!(
            text(r#"{"stre\u0061m":true}"#, ["stream", "x"])[0],
            Some("true".into())
        );
        assert_eq!(
            text(r#"{"b":1,"b":2,"a":3}"#, ["b", "a"]),
            [None, Some("3".into())]
        );
        assert_eq!(text(r#"{}"#, ["b", "a"]), [None, None]);
        let broken = [
            r#"[{"a":1}]"#,
            r#"{"a":1"#,
            r#"{"a":"1}"#,
            r#"{"a":"\"#,
            r#"{"a":1]]}"#,
            "",
        ];
        for broken in broken {
            assert_eq!(text(broken, ["a", "b"]), [None, None], "{broken:?}");
        }
    }

    /// A small deterministic generator (xorshift), for the comparison below.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    const KEYS: [&str; 5] = ["stream", "metadata", "user_id", "messages", "stre\\u0061m"];
    const STRINGS: [&str; 6] = ["", "stream", "a\\\"b", "\\\\", "}]{[,:", "é\\u00e9\\n"];

    /// A random JSON value whose objects use `KEYS` (so wanted fields appear nested,
    /// repeated and escaped) and whose strings hold quotes, backslashes and brackets.
    fn value(rng: &mut Rng, depth: u32) -> String {
        match rng.below(if depth > 4 { 4 } else { 6 }) {
            0 => ["true", "false", "null", "-1.5e3", "7"][rng.below(5) as usize].into(),
            1..=3 => format!("\"{}\"", STRINGS[rng.below(6) as usize]),
            4 => {
                let items: Vec<String> = (0..rng.below(4)).map(|_| value(rng, depth + 1)).collect();
                format!("[{}]", items.join(","))
            }
            _ => object(rng, depth + 1),
        }
    }

    fn object(rng: &mut Rng, depth: u32) -> String {
        let fields: Vec<String> = (0..rng.below(5))
            .map(|_| {
                let key = KEYS[rng.below(5) as usize];
                format!("\"{key}\" :\n{}", value(rng, depth))
            })
            .collect();
        format!(" {{{}}}\t", fields.join(" , "))
    }

    #[test]
    fn reads_what_serde_reads_field_by_field_in_random_valid_json() {
        #[derive(serde::Deserialize)]
        struct Stream {
            stream: Option<Value>,
        }
        #[derive(serde::Deserialize)]
        struct Metadata {
            metadata: Option<Value>,
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let body = object(&mut rng, 0);
            assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
            let [stream, metadata] = top_level(body.as_bytes(), ["stream", "metadata"]);
            // As an `Option<Value>`, as serde reads a field: `null` is None.
            let parsed = |v: Option<&[u8]>| {
                v.and_then(|v| serde_json::from_slice::<Option<Value>>(v).unwrap())
            };
            let expected_stream = serde_json::from_str::<Stream>(&body).ok().map(|s| s.stream);
            let expected_metadata = serde_json::from_str::<Metadata>(&body)
                .ok()
                .map(|m| m.metadata);
            // serde reads a duplicate field as an error and an absent one as None: both
            // are None here.
            assert_eq!(parsed(stream), expected_stream.flatten(), "{body}");
            assert_eq!(parsed(metadata), expected_metadata.flatten(), "{body}");
        }
    }
}
