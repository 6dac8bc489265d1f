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

/// Every variable a config reader asks for has a row in docs/configuration.md (named in the
/// table's first column). The names come from the source, so a variable added to the code
/// without a line in the docs fails here.
#[test]
fn every_variable_the_code_reads_is_in_the_configuration_docs() {
    let root = testkit::workspace_root();
    let mut read = std::collections::BTreeMap::<String, String>::new();
    let mut dirs = vec![root.join("shared/src")];
    for function in std::fs::read_dir(root.join("functions")).unwrap() {
        dirs.push(function.unwrap().path().join("src"));
    }
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let source = std::fs::read_to_string(&path).unwrap();
                for name in variables_read(&source) {
                    let file = path.strip_prefix(&root).unwrap().display().to_string();
                    read.entry(name).or_insert(file);
                }
            }
        }
    }
    // The scan must see the readers it is meant to see; without this a changed call shape would
    // let the test pass on nothing.
    assert!(
        read.len() > 20,
        "only {} variables found: {read:?}",
        read.len()
    );
    for known in [
        "DATABASE_URL",
        "STRIPE_WEBHOOK_SECRET",
        "LLM_TIMEOUT_MS",
        "AWS_LAMBDA_LOG_LEVEL",
    ] {
        assert!(read.contains_key(known), "the scan missed {known}");
    }

    let docs = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap_or_default();
    let documented: std::collections::BTreeSet<&str> = docs
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .collect();
    let missing: Vec<String> = read
        .iter()
        .filter(|(name, _)| !documented.contains(name.as_str()))
        .map(|(name, file)| format!("{name} (read in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "not in the first column of docs/configuration.md: {missing:?}"
    );
}

/// The variable names `source` reads outside its `#[cfg(test)]` module: SCREAMING_SNAKE_CASE
/// literals that are the first argument of a method on the reader (`env.integer("X", ..)`),
/// of a function handed the reader (`read_price_id(&mut env, "X", ..)`) or of `std::env::var`.
fn variables_read(source: &str) -> Vec<String> {
    // The unit tests sit in a `#[cfg(test)]` module at the end (`mod tests`, `pub(crate) mod ..`).
    let test_module = source
        .match_indices("#[cfg(test)]")
        .find(|(at, attribute)| {
            let mut item = source[at + attribute.len()..].lines().map(str::trim);
            let next = item.find(|line| !line.is_empty() && !line.starts_with("#["));
            next.is_some_and(|line| line.split_whitespace().any(|word| word == "mod"))
        });
    let source = test_module.map_or(source, |(end, _)| &source[..end]);
    let mut names = Vec::new();
    for (start, _) in source.match_indices('"') {
        let literal = &source[start + 1..];
        let Some(name) = literal.split('"').next() else {
            continue;
        };
        let screaming = name.contains('_')
            && name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !screaming {
            continue;
        }
        let mut before = source[..start].trim_end();
        let mut handed_the_reader = false;
        if let Some(rest) = before.strip_suffix(',') {
            let Some(rest) = rest.trim_end().strip_suffix("&mut env") else {
                continue;
            };
            before = rest.trim_end();
            handed_the_reader = true;
        }
        let Some(call) = before.strip_suffix('(') else {
            continue;
        };
        // The path or method chain before `(`, across the line breaks of `env\n    .optional(`.
        let mut callee = String::new();
        for c in call.chars().rev() {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':') {
                callee.insert(0, c);
            } else if !(c.is_whitespace() && callee.starts_with('.')) {
                break;
            }
        }
        let on_the_reader = callee
            .rsplit_once('.')
            .is_some_and(|(receiver, _)| receiver.ends_with("env"));
        if handed_the_reader || on_the_reader || callee.ends_with("env::var") {
            names.push(name.to_owned());
        }
    }
    names
}
