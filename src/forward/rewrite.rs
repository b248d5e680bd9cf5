//! What the proxy reads in or changes of a request body: `model_override` (rule: the body
//! re-serialised, its length recomputed) and the local `count_tokens` estimate (rule 10).

use crate::upstream::call::ClientRequest;
use ureq::http;

pub(crate) fn is_count_tokens(request: &ClientRequest) -> bool {
    request.method == http::Method::POST
        && request.target.split('?').next() == Some("/v1/messages/count_tokens")
}

/// About four characters a token: the text of `system`, `messages` and `tools`, counted
/// the way a tokenizer would roughly see it. An estimate, as the contract allows.
pub(crate) fn estimate_tokens(body: &[u8]) -> u64 {
    fn chars(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => s.chars().count(),
            serde_json::Value::Array(a) => a.iter().map(chars).sum(),
            serde_json::Value::Object(o) => o.iter().map(|(k, v)| k.len() + chars(v)).sum(),
            serde_json::Value::Null => 0,
            _ => 1,
        }
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (body.len() as u64).div_ceil(4);
    };
    let total: usize = ["system", "messages", "tools"]
        .iter()
        .map(|f| chars(&value[*f]))
        .sum();
    (total as u64).div_ceil(4).max(1)
}

/// `model_override`: the `model` of a JSON body replaced, the body re-serialised (its new
/// length is what goes upstream: qcc sent the old Content-Length and was refused).
pub fn override_model(body: &mut Vec<u8>, model: &str) {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let Some(object) = value.as_object_mut() else {
        return;
    };
    if !object.contains_key("model") {
        return;
    }
    object.insert("model".into(), serde_json::Value::from(model));
    if let Ok(bytes) = serde_json::to_vec(&value) {
        *body = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_override_rewrites_only_the_model() {
        let mut body = br#"{"model":"a","max_tokens":5,"messages":[]}"#.to_vec();
        override_model(&mut body, "claude-x");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["model"], "claude-x");
        assert_eq!(v["max_tokens"], 5);
        let mut other = b"not json".to_vec();
        override_model(&mut other, "claude-x");
        assert_eq!(other, b"not json");
    }

    #[test]
    fn token_estimate_counts_text_by_four() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"}]}"#;
        // "role"(4) + "user"(4) + "content"(7) + "abcdefgh"(8) = 23 → 6
        assert_eq!(estimate_tokens(body), 6);
    }
}
