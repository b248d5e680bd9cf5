//! A proxy whose five endpoints each show one kind of token usage and quota report, for
//! the tests of what `status` and the status page print: the figures come from real
//! answers of real mocks (`x-mock-usage`, `set_headers`) through the proxy.

use super::{Proxy, clear_of_midnight_utc, endpoint_in, post, wait_until};
use failover_proxy::mock::control::MockUpstream;
use failover_proxy::mock::fault::Fault;
use failover_proxy::time::iso8601;
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What each endpoint (`ep0` … `ep4`, in this order) was left with, today:
/// - `ep0` "api": 12 300 tokens of the priced model ($0.039903); 49 requests and 7 000
///   tokens left until `reset`.
/// - `ep1` "sub": 950 tokens of a model without a price; a subscription at 42 % of its
///   5-hour and 90 % of its 7-day window, `allowed_warning` until `unified_reset`.
/// - `ep2` "spent": 58 priced tokens ($0.00032955); no request left until `reset`, so
///   skipped until then.
/// - `ep3` "rejected": 4 100 000 priced tokens ($13.50); a `rejected` subscription whose
///   unified reset (`passed_reset`) has passed, so it is not skipped.
/// - `ep4` "idle": no traffic, no report.
pub struct QuotaScene {
    pub proxy: Proxy,
    pub mocks: [MockUpstream; 5],
    /// The API accounts' reset: whole seconds, ten minutes away.
    pub reset: SystemTime,
    /// `ep1`'s unified reset: whole seconds, an hour away.
    pub unified_reset: SystemTime,
    /// `ep3`'s unified reset: a minute ago.
    pub passed_reset: SystemTime,
}

impl QuotaScene {
    pub fn start() -> QuotaScene {
        clear_of_midnight_utc();
        let mocks = ["api", "sub", "spent", "rejected", "idle"]
            .map(|n| MockUpstream::start_named(n, Fault::None).unwrap());
        // One priced model, at Sonnet's prices per million tokens.
        let prices = json!({"claude-test": {"input": 3, "output": 15, "cache_write": 3.75, "cache_read": 0.3}});
        let proxy = Proxy::start(&mocks.each_ref(), json!({ "prices": prices }));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let reset = UNIX_EPOCH + Duration::from_secs(now + 600);
        let unified_reset = UNIX_EPOCH + Duration::from_secs(now + 3600);
        let passed_reset = UNIX_EPOCH + Duration::from_secs(now - 60);
        let [api, sub, spent, rejected, _idle] = &mocks;
        let reset_text = iso8601(reset);
        api.set_headers(&[
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", &reset_text),
            ("anthropic-ratelimit-tokens-remaining", "7000"),
            ("anthropic-ratelimit-tokens-reset", &reset_text),
        ]);
        sub.set_headers(&[
            ("anthropic-ratelimit-unified-status", "allowed_warning"),
            (
                "anthropic-ratelimit-unified-reset",
                &(now + 3600).to_string(),
            ),
            ("anthropic-ratelimit-unified-5h-utilization", "0.42"),
            ("anthropic-ratelimit-unified-7d-utilization", "0.9"),
        ]);
        spent.set_headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", &reset_text),
        ]);
        rejected.set_headers(&[
            ("anthropic-ratelimit-unified-status", "rejected"),
            ("anthropic-ratelimit-unified-reset", &(now - 60).to_string()),
        ]);
        let scene = QuotaScene {
            proxy,
            mocks,
            reset,
            unified_reset,
            passed_reset,
        };
        // Priority order sends each request to the first endpoint in rotation: ep0 and
        // ep1 are taken out after their request, ep2 takes itself out (its quota is
        // spent), and ep3 stays in; then ep0 and ep1 come back.
        scene.send(
            "claude-test",
            "input=12000,output=250,cache_creation=40,cache_read=10",
        );
        scene.set_enabled(0, false);
        scene.send("claude-unpriced", "input=900,output=50");
        scene.set_enabled(1, false);
        scene.send(
            "claude-test",
            "input=25,output=15,cache_creation=7,cache_read=11",
        );
        scene.send("claude-test", "input=4000000,output=100000");
        scene.set_enabled(0, true);
        scene.set_enabled(1, true);
        let answered = scene.mocks.each_ref().map(|m| m.requests());
        assert_eq!(answered, [1, 1, 1, 1, 0]);
        // Usage is counted just after an answer is written.
        for (i, input) in [(0, 12_000), (1, 900), (2, 25), (3, 4_000_000)] {
            wait_until("the answer's usage is counted", || {
                scene.proxy.endpoint_stats(i)["usage"]["today"]["input_tokens"] == input
            });
        }
        let stats = scene.proxy.stats();
        let spent = endpoint_in(&stats, &scene.proxy.id(2));
        assert!(spent["quota"]["skipped_until"].is_string(), "{spent}");
        scene
    }

    fn send(&self, model: &str, usage: &str) {
        let body = json!({"model": model, "max_tokens": 16,
                          "messages": [{"role": "user", "content": "hello"}]});
        let headers = [("x-mock-usage", usage)];
        let (status, answer) = post(&self.proxy.url, "/v1/messages", &body.to_string(), &headers);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    }

    fn set_enabled(&self, i: usize, on: bool) {
        let verb = if on { "enable" } else { "disable" };
        let path = format!("/__qcc__/endpoints/{}/{verb}", self.proxy.id(i));
        assert_eq!(post(&self.proxy.url, &path, "", &[]).0, 200, "{path}");
    }
}

/// `20:00:05` of a time: its time of day in UTC, to the second.
pub fn utc_clock(t: SystemTime) -> String {
    iso8601(t)[11..19].to_string()
}
