//! Stripe: webhook signatures and typed events.

pub mod client;
pub mod error;
pub mod events;
pub mod ids;
pub mod session;
pub mod signature;

/// The Stripe API version this code reads and, for API calls, pins (`Stripe-Version`).
pub const API_VERSION: &str = "2026-07-29.dahlia";
