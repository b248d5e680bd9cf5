//! `failover-proxy check --probe` (issue 9), the first thing a user runs when an endpoint
//! does not work: the real binary probes a healthy mock, a refused port, a mock that
//! refuses the key, a failing mock, and a TLS upstream with and without its CA, and each
//! endpoint's line says in plain words what happened, for both kinds of probe.

use crate::support::tls::{self, TestCa, TlsFront};
use crate::support::*;
use failover_proxy::mock::fault::Fault;
use serde_json::{Value, json};

/// One endpoint of the probed config and the words its line must hold.
struct Case {
    name: &'static str,
    base_url: String,
    settings: Value,
    ok: bool,
    words: &'static [&'static str],
}

fn case(name: &'static str, base_url: String, ok: bool, words: &'static [&'static str]) -> Case {
    Case {
        name,
        base_url,
        settings: json!({}),
        ok,
        words,
    }
}

fn assert_probe_lines(probe: Value, healthy_words: &'static [&'static str]) {
    let mocks = [Fault::None, Fault::Status(401), Fault::Status(500)].map(mock);
    let ca = TestCa::new();
    let ca_file = ca.write_pem();
    let front = TlsFront::start(&ca, mocks[0].addr());
    let trusted = json!({"ca_file": ca_file.path_str()});
    let cases = [
        case("healthy", mocks[0].url(), true, healthy_words),
        case(
            "refused",
            refused_url(),
            false,
            &["connect:", "connection refused"],
        ),
        case(
            "badkey",
            mocks[1].url(),
            false,
            &["auth:", "HTTP 401", "key was refused"],
        ),
        case("failing", mocks[2].url(), false, &["probe:", "HTTP 500"]),
        case(
            "untrusted",
            front.url(),
            false,
            &["TLS:", "certificate", "unknown CA", "ca_file"],
        ),
        Case {
            settings: trusted,
            ..case("trusted", front.url(), true, healthy_words)
        },
    ];
    let endpoints: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut endpoint = endpoint_json(i, &c.base_url, c.settings.clone());
            endpoint["name"] = json!(c.name);
            endpoint
        })
        .collect();
    let output = tls::check_probe(&json!({"probe": probe, "endpoints": endpoints}), &[]);
    for c in &cases {
        let line = tls::probe_line(&output, c.name);
        let verdict = if c.ok { "ok" } else { "FAILED" };
        assert!(line.starts_with(verdict), "{}: {line}", c.name);
        for word in c.words {
            assert!(line.contains(word), "{}: no {word:?} in {line:?}", c.name);
        }
    }
    for i in 0..cases.len() {
        assert!(!output.contains(&key(i)), "key {i} was printed:\n{output}");
    }
}

#[test]
fn check_probe_says_per_endpoint_whether_connect_tls_auth_or_the_conversation_failed() {
    assert_probe_lines(
        json!({"kind": "conversation"}),
        &["answered 200 with the code"],
    );
}

#[test]
fn check_probe_says_per_endpoint_whether_connect_tls_auth_or_the_http_get_failed() {
    let probe = json!({"kind": "http", "path": "/v1/models"});
    assert_probe_lines(probe, &["GET /v1/models answered HTTP 200"]);
}
