//! The config loader's unit tests (a file of their own: the loader is long enough).

use super::*;

fn parse(text: &str) -> Result<Config, String> {
    Config::from_json(text, &Overrides::default(), &|name| {
        (name == "BACKUP_KEY").then(|| "sk-from-env-0123456789".to_string())
    })
}

const MINIMAL: &str =
    r#"{"endpoints":[{"base_url":"https://api.anthropic.com/","api_key":"sk-ant-1"}]}"#;

#[test]
fn minimal_config_gets_every_default() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:7860");
    assert_eq!(c.workers, 64);
    assert_eq!(c.strategy, Strategy::PriorityFailover);
    assert_eq!((c.max_attempts, c.max_attempts_per_endpoint), (5, 2));
    assert_eq!(c.max_body_bytes, 33554432);
    assert_eq!(c.max_body_memory, 1 << 30);
    assert_eq!(c.client_send_timeout, Duration::from_secs(60));
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.recovery_interval, Duration::from_secs(60));
    assert_eq!(c.recovery_max_interval, Duration::from_secs(600));
    assert_eq!(c.rate_limit_cooldown, Duration::from_secs(30));
    assert_eq!((c.quota_reserve, c.prices.len()), (0, 0));
    assert_eq!(c.affinity_ttl, Duration::from_secs(18000));
    assert_eq!(c.probe.kind, ProbeKind::Conversation);
    assert_eq!(c.probe.model, "claude-3-5-haiku-20241022");
    assert_eq!(
        (c.probe.max_tokens, c.probe.path.as_str()),
        (20, "/v1/models")
    );
    let e = &c.endpoints[0];
    assert_eq!(e.base_url, "https://api.anthropic.com");
    assert_eq!(e.name, "api.anthropic.com");
    assert_eq!(
        (e.weight, e.priority, e.enabled, e.max_failures),
        (100, 1, true, 3)
    );
    assert_eq!(e.timeout, Duration::from_secs(600));
    assert_eq!(e.auth, Auth::Both);
}

#[test]
fn auth_names_which_headers_carry_the_key() {
    let with_auth = |auth: &str| {
        parse(&format!(
            r#"{{"endpoints":[{{"base_url":"http://a","api_key":"k"}},
                             {{"base_url":"http://b","api_key":"k","auth":{auth}}}]}}"#
        ))
    };
    for (auth, expected) in [
        ("\"x-api-key\"", Auth::XApiKey),
        ("\"bearer\"", Auth::Bearer),
        ("\"both\"", Auth::Both),
    ] {
        let c = with_auth(auth).unwrap();
        assert_eq!(
            (c.endpoints[0].auth, c.endpoints[1].auth),
            (Auth::Both, expected)
        );
    }
    assert_eq!(
        with_auth("\"Bearer\"").unwrap_err(),
        r#"endpoints[1].auth: "Bearer" must be "x-api-key", "bearer" or "both""#
    );
    let err = with_auth("1").unwrap_err();
    assert!(err.contains("invalid type"), "{err}");
    let d = EndpointConfig::with_defaults("ep", "http://a", "k").unwrap();
    assert_eq!(d.auth, Auth::Both);
}

#[test]
fn endpoint_id_is_sha256_of_url_and_key_as_in_qcc() {
    let c = parse(MINIMAL).unwrap();
    // python3 -c 'import hashlib;print(hashlib.sha256(b"https://api.anthropic.com|sk-ant-1").hexdigest()[:8])'
    assert_eq!(c.endpoints[0].id.to_string(), "f0d912f2");
}

#[test]
fn unknown_field_is_named_with_its_place() {
    let err =
        parse(r#"{"endpoints":[{"base_url":"http://a","api_key":"k","wieght":3}]}"#).unwrap_err();
    assert!(err.contains("unknown field `wieght`"), "{err}");
    assert!(err.starts_with("line 1, column "), "{err}");
    let err = parse(r#"{"listen":"127.0.0.1:1","colour":1,"endpoints":[]}"#).unwrap_err();
    assert!(err.contains("unknown field `colour`"), "{err}");
}

#[test]
fn missing_base_url_and_bad_json_are_named() {
    let err = parse(r#"{"endpoints":[{"api_key":"k"}]}"#).unwrap_err();
    assert!(err.contains("missing field `base_url`"), "{err}");
    let err = parse("{\"endpoints\": [\n  {,}]}").unwrap_err();
    assert!(err.starts_with("line 2, column 4"), "{err}");
    let err = parse(r#"{"listen":"x"}"#).unwrap_err();
    assert!(err.contains("missing field `endpoints`"), "{err}");
}

#[test]
fn key_rules() {
    let c = parse(r#"{"endpoints":[{"base_url":"http://a","api_key_env":"BACKUP_KEY"}]}"#).unwrap();
    assert_eq!(c.endpoints[0].api_key.expose(), "sk-from-env-0123456789");
    let err = parse(r#"{"endpoints":[{"base_url":"http://a","api_key_env":"NOPE"}]}"#).unwrap_err();
    assert_eq!(
        err,
        "endpoints[0].api_key_env: environment variable NOPE is not set"
    );
    let err = parse(r#"{"endpoints":[{"base_url":"http://a"}]}"#).unwrap_err();
    assert!(err.starts_with("endpoints[0]: missing api_key"), "{err}");
    let err = parse(
        r#"{"endpoints":[{"base_url":"http://a","api_key":"k","api_key_env":"BACKUP_KEY"}]}"#,
    )
    .unwrap_err();
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn invalid_values_name_their_field() {
    let cases = [
        (r#"{"endpoints":[]}"#, "endpoints: at least one"),
        (
            r#"{"endpoints":[{"base_url":"ftp://a","api_key":"k"}]}"#,
            "endpoints[0].base_url",
        ),
        (
            r#"{"endpoints":[{"base_url":"http://a","api_key":"k","weight":0}]}"#,
            "endpoints[0].weight",
        ),
        (
            r#"{"endpoints":[{"base_url":"http://a","api_key":"k","timeout":-1}]}"#,
            "endpoints[0].timeout",
        ),
        (
            r#"{"max_attempts":0,"endpoints":[{"base_url":"http://a","api_key":"k"}]}"#,
            "max_attempts:",
        ),
        (
            r#"{"strategy":"fastest","endpoints":[{"base_url":"http://a","api_key":"k"}]}"#,
            "unknown variant `fastest`",
        ),
        (
            r#"{"listen":"0.0.0.0:7860","endpoints":[{"base_url":"http://a","api_key":"k"}]}"#,
            "access_tokens is empty",
        ),
        (
            r#"{"endpoints":[{"base_url":"http://a","api_key":"k"},{"base_url":"http://a/","api_key":"k"}]}"#,
            "endpoints[1]: same base_url",
        ),
        (
            r#"{"max_body_memory":1000,"endpoints":[{"base_url":"http://a","api_key":"k"}]}"#,
            "max_body_memory: 1000 is less than max_body_bytes (33554432)",
        ),
        (
            r#"{"client_send_timeout":0,"endpoints":[{"base_url":"http://a","api_key":"k"}]}"#,
            "client_send_timeout: must be greater than 0",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(text).unwrap_err();
        assert!(err.contains(expected), "{text} → {err}");
    }
}

#[test]
fn an_unset_max_body_memory_holds_at_least_one_body_of_max_body_bytes() {
    let two_gib = 2usize << 30;
    let text = format!(
        r#"{{"max_body_bytes":{two_gib},"endpoints":[{{"base_url":"http://a","api_key":"k"}}]}}"#
    );
    assert_eq!(parse(&text).unwrap().max_body_memory, two_gib);
}

#[test]
fn errors_never_contain_the_key() {
    let err = parse(
        r#"{"endpoints":[{"base_url":"http://a","api_key":"sk-secret-key-999","wieght":1}]}"#,
    )
    .unwrap_err();
    assert!(!err.contains("sk-secret-key-999"), "{err}");
}

#[test]
fn overrides_win_over_the_file() {
    let o = Overrides {
        listen: Some("127.0.0.1:9999".into()),
        workers: Some(3),
    };
    let c = Config::from_json(MINIMAL, &o, &|_| None).unwrap();
    assert_eq!(c.listen.port(), 9999);
    assert_eq!(c.workers, 3);
}

#[test]
fn quota_reserve_and_prices_load_and_comments_are_ignored() {
    let text = r#"{"//": "a comment", "quota_reserve": 5,
        "prices": {"//": "USD per million tokens",
                   "claude-x": {"input": 3, "output": 15, "cache_write": 3.75, "cache_read": 0.3}},
        "endpoints":[{"base_url":"https://api.anthropic.com","api_key":"sk-ant-1"}]}"#;
    let c = parse(text).unwrap();
    assert_eq!(c.quota_reserve, 5);
    assert_eq!(c.prices["claude-x"].output, 15.0);
    let negative = MINIMAL.replacen('{', r#"{"quota_reserve": -1, "#, 1);
    let error = parse(&negative).unwrap_err();
    // serde's type errors point at the place, as for every integer field.
    assert!(
        error.starts_with("line 1, column 20: invalid value: integer `-1`"),
        "{error}"
    );
    let wrong = MINIMAL.replacen('{', r#"{"prices": {"m": {"input": 1}}, "#, 1);
    assert!(
        parse(&wrong)
            .unwrap_err()
            .starts_with("prices.m.output: missing")
    );
}
