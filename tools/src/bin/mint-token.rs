//! Prints a Supabase-shaped HS256 access token for local runs, signed with SUPABASE_JWT_SECRET
//! (default: the scripts/dev secret), for the demo user unless a user id is given.
//!
//! Usage: mint-token [USER_UUID]

fn main() {
    let user = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "00000000-0000-4000-8000-000000000001".into());
    let secret = std::env::var("SUPABASE_JWT_SECRET")
        .unwrap_or_else(|_| "local-dev-jwt-secret-change-me-0123456789".into());
    let issuer = std::env::var("SUPABASE_URL")
        .ok()
        .map(|u| format!("{}/auth/v1", u.trim_end_matches('/')));
    let claims = testkit::tokens::user_claims(&user, issuer.as_deref());
    println!("{}", testkit::tokens::hs256(&claims, secret.as_bytes()));
}
