//! `GET /__qcc__/logs`: the query read, the tail of `--log-file` answered (`logfile`).

use crate::server::admin::answer::Answer;
use crate::server::admin::logfile;
use crate::state::shared::State;
use serde_json::json;

/// `GET /__qcc__/logs?lines=N&level=LEVEL&grep=TEXT`: the tail of `--log-file`.
pub(super) fn logs(state: &State, query: &str) -> Answer {
    let Some(path) = state.source.get().and_then(|s| s.log_file.clone()) else {
        return Answer::Error(
            404,
            "not_found_error",
            "no log file: start serve with --log-file".into(),
        );
    };
    let params = parse_query(query);
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let lines = param("lines")
        .and_then(|n| n.parse().ok())
        .unwrap_or(100usize)
        .min(10_000);
    let min_level = param("level").and_then(|l| l.parse::<log::Level>().ok());
    let grep = param("grep").unwrap_or("");
    let tail = match logfile::tail(&path, lines, min_level, grep) {
        Ok(tail) => tail,
        Err(e) => return Answer::Error(500, "api_error", format!("cannot read the log file: {e}")),
    };
    Answer::Json(
        200,
        json!({ "file": path.display().to_string(), "lines": tail }),
    )
}

/// `a=1&b=x%20y` → pairs, percent-decoded (`+` is a space, as forms send it).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let q = parse_query("lines=20&grep=entered%20the+queue&level=warn&flag");
        assert_eq!(q[0], ("lines".into(), "20".into()));
        assert_eq!(q[1], ("grep".into(), "entered the queue".into()));
        assert_eq!(q[3], ("flag".into(), "".into()));
        assert_eq!(percent_decode("100%"), "100%");
    }
}
