//! Forwarding and failover through the real proxy over loopback.

use crate::support::*;
use failover_proxy::mock::Fault;
use serde_json::json;

#[test]
fn forwards_to_a_healthy_endpoint_with_its_key() {
    let up = mock(Fault::None);
    let proxy = Proxy::start(&[&up], json!({}));
    let (status, body) = post_message(&proxy.url, &[("x-api-key", "client-key")]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rec = up.recorded();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].header("x-api-key"), Some(key(0).as_str()));
    assert_eq!(rec[0].header("authorization"), Some(format!("Bearer {}", key(0)).as_str()));
    assert_eq!(rec[0].header("anthropic-version"), Some("2023-06-01"));
}
