//! Shared by the `chat`, `checkout` and `webhook` functions: configuration, errors, telemetry,
//! the Lambda adapter, the data store and the Stripe integration.

pub mod auth;
pub mod clock;
pub mod config;
pub mod error;
pub mod function_url;
pub mod http_client;
pub mod lambda;
pub mod llm;
pub mod payments;
pub mod retry;
pub mod sentry;
pub mod store;
pub mod stripe;
pub mod telemetry;
