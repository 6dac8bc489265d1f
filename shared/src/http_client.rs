//! The one outbound HTTP client setup (reqwest on rustls with ring and the web PKI roots), so
//! every client in the workspace shares one TLS stack.

use std::time::Duration;

/// A client with explicit connect and total timeouts.
pub fn build(connect_timeout: Duration, timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("saas-functions/", env!("CARGO_PKG_VERSION")))
        .build()
}
