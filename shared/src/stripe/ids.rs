//! Stripe ids the code passes around or puts into URLs, checked once where they enter.

use std::fmt;

/// A Checkout Session id: `cs_` then ASCII letters, digits and `_`, at most 255 characters.
/// Checked before it goes into a URL path or a query, so no id can reach another endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(String);

/// A value that is not the id it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a Stripe {0} id")]
pub struct InvalidId(pub &'static str);

impl SessionId {
    /// The one rule for session ids, wherever they come from (a query, an event, the database).
    pub fn parse(id: &str) -> Result<Self, InvalidId> {
        let well_formed = id.starts_with("cs_")
            && (4..=255).contains(&id.len())
            && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if well_formed {
            Ok(Self(id.to_owned()))
        } else {
            Err(InvalidId("Checkout Session"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Price id. Stripe's are `price_...`; test setups may use their own (`plan_...` of old
/// accounts, a fake's ids), so the prefix is required only in production (see the config).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PriceId(String);

impl PriceId {
    /// A non-empty id without whitespace or control characters (at most 255 bytes). It only
    /// ever goes into a form-encoded body, so no other character is refused.
    pub fn parse(id: &str) -> Result<Self, InvalidId> {
        let well_formed = (1..=255).contains(&id.len())
            && !id.chars().any(|c| c.is_whitespace() || c.is_control());
        if well_formed {
            Ok(Self(id.to_owned()))
        } else {
            Err(InvalidId("Price"))
        }
    }

    /// Whether it has the `price_` prefix of Stripe's own ids.
    pub fn is_stripe_price(&self) -> bool {
        self.0.starts_with("price_")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PriceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_checked_once() {
        for id in ["cs_test_a1B2c3", "cs_live_abc", "cs_1"] {
            assert_eq!(
                SessionId::parse(id).map(|s| s.to_string()),
                Ok(id.to_owned())
            );
        }
        let long = format!("cs_{}", "a".repeat(253));
        for id in [
            "", "cs_", "cs_a/b", "cs_a?x=1", "pi_123", "cs_é", "cs_a b", &long,
        ] {
            assert_eq!(
                SessionId::parse(id),
                Err(InvalidId("Checkout Session")),
                "{id}"
            );
        }
    }

    #[test]
    fn price_ids_are_plain_tokens() {
        assert!(PriceId::parse("price_1Abc").unwrap().is_stripe_price());
        assert!(!PriceId::parse("plan_gold").unwrap().is_stripe_price());
        assert!(PriceId::parse("plan-gold.v2").is_ok());
        for id in ["", "price 1", "price_1\n", " price_1"] {
            assert!(PriceId::parse(id).is_err(), "{id}");
        }
    }
}
