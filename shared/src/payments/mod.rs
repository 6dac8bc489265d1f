//! Payments from Stripe's truth (docs/payments.md). Three layers, kept apart:
//! - **facts** ([`facts`], [`read`]): Stripe's objects read from the API, never reconstructed
//!   from events; an event only names what to read ([`target`]);
//! - **decisions**: pure SQL over the facts (supabase/schemas/30_decisions.sql): which payment
//!   stands, what is due, each order's state, who owns what;
//! - **actions** ([`act`]): refunds and expiries, retried under fresh idempotency keys until the
//!   facts show them done.
//!
//! [`sync`] is the one path through the three, for the webhook, checkout and the reconciler.

pub mod act;
pub mod facts;
pub mod read;
pub mod sync;
pub mod target;

pub use facts::Facts;
pub use read::Reader;
pub use sync::{SyncError, Synced, Syncer};
pub use target::{target_of, Target};
