//! The documentation names what the code handles: every event type the webhook acts on is in
//! docs/api.md (its table and the `stripe listen --events` line an operator copies).

#[test]
fn every_handled_event_type_is_documented_for_the_endpoint() {
    let api = std::fs::read_to_string(testkit::workspace_root().join("docs/api.md")).unwrap();
    let listen = api
        .lines()
        .find(|l| l.starts_with("stripe listen"))
        .expect("a `stripe listen --events` line in docs/api.md");
    let listed: Vec<&str> = listen
        .rsplit("--events ")
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect();
    let handled: Vec<&str> = shared::stripe::events::handled_event_types().collect();
    assert_eq!(listed, handled, "docs/api.md's stripe listen line");
    for type_ in handled {
        assert!(
            api.lines()
                .any(|l| l.starts_with("| `") && l.contains(&format!("`{type_}`"))),
            "{type_} is not in docs/api.md's event table"
        );
    }
}
