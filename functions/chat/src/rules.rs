//! The rule engine that answers when the LLM cannot: patterns to replies, with priorities and a
//! default reply.
//!
//! Matching is case-insensitive substring search on the user's last message, so it works for
//! Chinese (no spaces between words) as well as English: no whitespace tokenising. The highest
//! priority rule with a matching pattern wins; between equal priorities, the longest matching
//! pattern, then the earlier rule.

use serde::Deserialize;

/// The embedded default rules (`functions/chat/rules/default.json`).
pub const DEFAULT_RULES: &str = include_str!("../rules/default.json");

/// Longest pattern and reply accepted from a rules file.
const MAX_PATTERN_CHARS: usize = 200;
const MAX_REPLY_CHARS: usize = 8000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    default_reply: String,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    #[serde(default)]
    priority: i32,
    patterns: Vec<String>,
    reply: String,
}

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    priority: i32,
    /// Lower-cased patterns.
    patterns: Vec<String>,
    reply: String,
}

/// A loaded, validated set of rules.
#[derive(Clone, Debug)]
pub struct RuleBook {
    default_reply: String,
    rules: Vec<Rule>,
}

/// The rule engine's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleAnswer<'a> {
    /// The matched rule's name, or `default`.
    pub rule: &'a str,
    pub reply: &'a str,
}

impl RuleBook {
    /// Parses and validates a rules file (JSON).
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RulesFile =
            serde_json::from_str(text).map_err(|e| format!("not a rules file: {e}"))?;
        if file.default_reply.trim().is_empty() {
            return Err("default_reply is empty".into());
        }
        let mut rules = Vec::with_capacity(file.rules.len());
        for rule in file.rules {
            let patterns: Vec<String> = rule
                .patterns
                .iter()
                .map(|p| p.trim().to_lowercase())
                .filter(|p| !p.is_empty())
                .collect();
            if patterns.is_empty() {
                return Err(format!("rule {:?} has no pattern", rule.name));
            }
            if patterns
                .iter()
                .any(|p| p.chars().count() > MAX_PATTERN_CHARS)
                || rule.reply.chars().count() > MAX_REPLY_CHARS
                || rule.reply.trim().is_empty()
            {
                return Err(format!(
                    "rule {:?} has an empty or oversized pattern or reply",
                    rule.name
                ));
            }
            rules.push(Rule {
                name: rule.name,
                priority: rule.priority,
                patterns,
                reply: rule.reply,
            });
        }
        Ok(Self {
            default_reply: file.default_reply,
            rules,
        })
    }

    /// The embedded default rules.
    pub fn embedded() -> Self {
        // The embedded file is checked by a unit test; an empty book is the only fallback.
        Self::parse(DEFAULT_RULES).unwrap_or_else(|_| Self {
            default_reply: "Please try again in a moment.".into(),
            rules: Vec::new(),
        })
    }

    /// The answer for `text`.
    pub fn answer(&self, text: &str) -> RuleAnswer<'_> {
        let lowered = text.to_lowercase();
        let mut best: Option<(&Rule, usize)> = None;
        for rule in &self.rules {
            let matched = rule
                .patterns
                .iter()
                .filter(|p| lowered.contains(p.as_str()))
                .map(|p| p.chars().count())
                .max();
            if let Some(len) = matched {
                let better = match best {
                    None => true,
                    Some((b, blen)) => {
                        rule.priority > b.priority || (rule.priority == b.priority && len > blen)
                    }
                };
                if better {
                    best = Some((rule, len));
                }
            }
        }
        match best {
            Some((rule, _)) => RuleAnswer {
                rule: &rule.name,
                reply: &rule.reply,
            },
            None => RuleAnswer {
                rule: "default",
                reply: &self.default_reply,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_rules_parse() {
        RuleBook::parse(DEFAULT_RULES).unwrap();
    }

    #[test]
    fn chinese_and_english_match_without_tokenising() {
        let book = RuleBook::embedded();
        for (text, rule) in [
            ("How much does the full report cost?", "full_report"),
            ("HOW DO I UNLOCK it", "full_report"),
            ("我想购买完整报告多少钱", "full_report"),
            ("为什么我被重复扣款了", "payment_problem"),
            ("I was charged twice and want a refund", "refund"),
            ("请帮我退款", "refund"),
            ("忘记密码怎么办", "account"),
            ("你好", "greeting"),
            ("tell me a joke", "default"),
            ("", "default"),
        ] {
            assert_eq!(book.answer(text).rule, rule, "{text}");
        }
    }

    #[test]
    fn priority_then_longest_pattern_then_order() {
        let book = RuleBook::parse(
            r#"{"default_reply": "d", "rules": [
            {"name": "a", "priority": 1, "patterns": ["pay"], "reply": "A"},
            {"name": "b", "priority": 1, "patterns": ["payment"], "reply": "B"},
            {"name": "c", "priority": 5, "patterns": ["x"], "reply": "C"},
            {"name": "d", "priority": 1, "patterns": ["pay"], "reply": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(book.answer("payment").rule, "b");
        assert_eq!(book.answer("pay").rule, "a");
        assert_eq!(book.answer("pay x").rule, "c");
    }

    #[test]
    fn invalid_files_are_refused() {
        for text in [
            "",
            "{}",
            r#"{"default_reply": ""}"#,
            r#"{"default_reply": "d", "rules": [{"name": "a", "patterns": [], "reply": "r"}]}"#,
            r#"{"default_reply": "d", "rules": [{"name": "a", "patterns": ["  "], "reply": "r"}]}"#,
            r#"{"default_reply": "d", "extra": 1}"#,
        ] {
            assert!(RuleBook::parse(text).is_err(), "{text}");
        }
    }
}
