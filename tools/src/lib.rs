//! Developer and operator commands: `preflight` (the deployment checklist), `stripe-trigger`,
//! `fake-stripe`, `mint-token`, `stream-ttfb`.

pub mod preflight;
