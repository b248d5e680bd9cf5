//! `failover-proxy status`: one GET of a running proxy's `/__qcc__/stats`, printed as a
//! table with a line per endpoint. The table reads only the stats' JSON, so it shows what
//! any client of the admin API would see.

use crate::cli::error::CliError;
use serde_json::Value;

/// Reads `{url}/__qcc__/stats` and prints it as a table.
pub fn run(url: &str) -> Result<(), CliError> {
    let stats_url = format!("{}/__qcc__/stats", url.trim_end_matches('/'));
    let fail = |e: String| CliError::Startup(format!("cannot read {stats_url}: {e}"));
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut response = agent
        .get(&stats_url)
        .call()
        .map_err(|e| fail(e.to_string()))?;
    let body = response
        .body_mut()
        .read_to_vec()
        .map_err(|e| fail(e.to_string()))?;
    let stats: Value = serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))?;
    print!("{}", table(&stats));
    Ok(())
}

/// The summary line, then one line per endpoint. Fixed widths keep the columns aligned for
/// names up to 16 characters; everything before the last error fits in 110 columns, and
/// the last error comes last because it is the one of unbounded length.
fn table(s: &Value) -> String {
    let mut out = format!(
        "requests {} (ok {}, failed {}), uptime {:.0}s, healthy endpoints {}/{}, queued {}\n",
        s["total_requests"],
        s["successful_requests"],
        s["failed_requests"],
        s["uptime"].as_f64().unwrap_or(0.0),
        s["healthy_endpoints"],
        s["total_endpoints"],
        s["failure_queue_size"]
    );
    out += &format!(
        "{:<16} {:<8} {:>4} {:<9} {:>8} {:>6} {:>6} {:>6}  {:<13}  {:<21}  last error\n",
        "name",
        "id",
        "prio",
        "state",
        "attempts",
        "failed",
        "avg ms",
        "flight",
        "tokens today",
        "quota"
    );
    let queued: Vec<&str> = s["failed_endpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for e in s["endpoints"].as_array().into_iter().flatten() {
        let h = &e["health_status"];
        let id = e["id"].as_str().unwrap_or("");
        let line = format!(
            "{:<16} {:<8} {:>4} {:<9} {:>8} {:>6} {:>6.0} {:>6}  {:<13}  {:<21}  {}",
            text(&e["name"]),
            id,
            text(&e["priority"]),
            state(e, queued.contains(&id)),
            text(&h["total_requests"]),
            text(&h["failed_requests"]),
            h["avg_response_time"].as_f64().unwrap_or(0.0),
            text(&e["in_flight"]),
            tokens_today(&e["usage"]["today"]),
            quota(&e["quota"]),
            text(&h["last_error"])
        );
        out += line.trim_end();
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The state an operator acts on first: a disabled or queued endpoint is that whatever
/// else is true; a cooldown or a spent quota keeps an otherwise fine endpoint out.
fn state(e: &Value, queued: bool) -> &str {
    if e["enabled"] == false {
        "disabled"
    } else if queued {
        "QUEUED"
    } else if !e["cooldown_until"].is_null() {
        "cooling"
    } else if !e["quota"]["skipped_until"].is_null() {
        "spent"
    } else {
        e["health_status"]["status"].as_str().unwrap_or("?")
    }
}

/// The four kinds of tokens of `usage.today` added up, right-aligned in six characters so
/// the numbers line up, then the cost when a model used is priced: `12.3k $0.04`.
fn tokens_today(today: &Value) -> String {
    let kinds = [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ];
    let total = kinds
        .iter()
        .filter_map(|k| today[*k].as_u64())
        .fold(0u64, u64::saturating_add);
    match today["cost_usd"].as_f64() {
        Some(cost) => format!("{:>6} {}", compact(total), dollars(cost)),
        None => format!("{:>6}", compact(total)),
    }
}

/// `950`, `12.3k`, `4.1M`, `2.0G`: at most one decimal, rounded half up in integers (the
/// status page rounds the same way, so both show the same figure).
fn compact(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    let tenths = |tenth: u64| n / tenth + u64::from(n % tenth >= tenth / 2);
    // 999.96k shows as 1.0M, not 1000.0k.
    let (suffix, t) = [("k", tenths(100)), ("M", tenths(100_000))]
        .into_iter()
        .find(|&(_, t)| t < 10_000)
        .unwrap_or(("G", tenths(100_000_000)));
    format!("{}.{}{suffix}", t / 10, t % 10)
}

/// Dollars to the cent, rounded half up as the status page does; a cost below half a
/// cent says so instead of showing `$0.00`.
fn dollars(cost: f64) -> String {
    let cents = (cost * 100.0).round() as u64;
    if cost > 0.0 && cents == 0 {
        "<$0.01".into()
    } else {
        format!("${}.{:02}", cents / 100, cents % 100)
    }
}

/// What the last rate-limit report said, in brief: while the endpoint is skipped, until
/// when (UTC); a rejected subscription; else the remaining requests and tokens and the
/// subscription windows' utilization, whichever were reported. Empty when none was.
fn quota(q: &Value) -> String {
    if let Some(until) = q["skipped_until"].as_str() {
        return format!("SPENT until {}", time_of_day(until));
    }
    if q["unified_status"] == "rejected" {
        return "rejected".into();
    }
    let mut parts = Vec::new();
    if let Some(n) = q["requests_remaining"].as_u64() {
        parts.push(format!("req {n}"));
    }
    if let Some(n) = q["tokens_remaining"].as_u64() {
        parts.push(format!("tok {}", compact(n)));
    }
    for (window, field) in [("5h", "utilization_5h"), ("7d", "utilization_7d")] {
        if let Some(f) = q[field].as_f64() {
            parts.push(format!("{window} {:.0}%", (f * 100.0).round()));
        }
    }
    parts.join(" ")
}

/// `20:00:05Z` from `2026-11-25T20:00:04.999Z`: the time of day to the nearest second. A
/// skip is kept as an `Instant` and comes back as a wall time a few microseconds off the
/// reset the upstream named; cutting the fraction off would show the second before.
fn time_of_day(iso: &str) -> String {
    let rounded = || {
        let n = |r: std::ops::Range<usize>| iso.get(r)?.parse::<u32>().ok();
        let mut secs = n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?;
        if n(20..23)? >= 500 {
            secs = (secs + 1) % 86_400;
        }
        Some(format!(
            "{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        ))
    };
    rounded().unwrap_or_else(|| iso.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compact_counts_round_half_up_and_carry_into_the_next_unit() {
        let cases = [
            (0, "0"),
            (950, "950"),
            (999, "999"),
            (1000, "1.0k"),
            (7000, "7.0k"),
            (12_250, "12.3k"),
            (12_249, "12.2k"),
            (999_949, "999.9k"),
            (999_950, "1.0M"),
            (4_100_000, "4.1M"),
            (999_950_000, "1.0G"),
            (u64::MAX, "18446744073.7G"),
        ];
        for (n, shown) in cases {
            assert_eq!(compact(n), shown, "{n}");
        }
    }

    #[test]
    fn dollars_to_the_cent_and_below_a_cent_says_so() {
        assert_eq!(dollars(0.0), "$0.00");
        assert_eq!(dollars(0.0003), "<$0.01");
        assert_eq!(dollars(0.039903), "$0.04");
        assert_eq!(dollars(1234.5), "$1234.50");
    }

    #[test]
    fn the_time_of_day_is_rounded_to_the_second() {
        assert_eq!(time_of_day("2026-11-25T20:00:04.999Z"), "20:00:05Z");
        assert_eq!(time_of_day("2026-11-25T20:00:05.001Z"), "20:00:05Z");
        assert_eq!(time_of_day("2026-11-25T23:59:59.500Z"), "00:00:00Z");
        assert_eq!(time_of_day("soon"), "soon");
    }

    #[test]
    fn quota_shows_what_was_reported() {
        let null = json!({"requests_remaining": null, "skipped_until": null});
        assert_eq!(quota(&null), "");
        let api = json!({"requests_remaining": 49, "tokens_remaining": 7000});
        assert_eq!(quota(&api), "req 49 tok 7.0k");
        let sub =
            json!({"unified_status": "allowed", "utilization_5h": 0.42, "utilization_7d": 0.9});
        assert_eq!(quota(&sub), "5h 42% 7d 90%");
        let rejected = json!({"unified_status": "rejected", "utilization_5h": 1.0});
        assert_eq!(quota(&rejected), "rejected");
        let spent = json!({"requests_remaining": 0, "skipped_until": "2026-11-25T20:00:04.9995Z"});
        assert_eq!(quota(&spent), "SPENT until 20:00:05Z");
    }
}
