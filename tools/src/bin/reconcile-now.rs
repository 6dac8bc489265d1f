//! One reconciler run by hand: `reconcile-now [--since 3d|12h|90m|<unix seconds>] [--json]`, reading
//! the environment as the deployed reconciler does (DATABASE_URL or SUPABASE_URL with the
//! service role key, STRIPE_SECRET_KEY, STRIPE_FULL_REPORT_PRICE_ID). Without `--since` it starts
//! a little before the last run that finished. Exit code 1 when the run failed or left anything.

use shared::config::EnvReader;

fn since(arg: &str, now: i64) -> Option<i64> {
    let (digits, unit) = arg.split_at(arg.find(|c: char| !c.is_ascii_digit()).unwrap_or(arg.len()));
    let n: i64 = digits.parse().ok()?;
    let seconds = match unit {
        "" => return Some(n),
        "d" => n.checked_mul(86_400)?,
        "h" => n.checked_mul(3600)?,
        "m" => n.checked_mul(60)?,
        _ => return None,
    };
    Some(now - seconds)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let mut from = None;
    let mut json = false;
    let now = shared::clock::Clock::system().unix_s();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--since" => match args.next().and_then(|v| since(&v, now)) {
                Some(s) => from = Some(s),
                None => {
                    eprintln!("--since takes 3d, 12h, 90m or Unix seconds");
                    return std::process::ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("usage: reconcile-now [--since 3d|12h|90m|<unix seconds>] [--json]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    shared::telemetry::init_tracing();
    let config = match reconcile::Config::read(EnvReader::from_env()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let state = match reconcile::State::new(config) {
        Ok(state) => state,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match reconcile::handle(&state, from, None).await {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!(
                    "run {}: {} undelivered event(s) listed since {} ({} new), {} session(s) and {} payment(s) read again, {} repaired",
                    report.run, report.events_listed, report.since, report.events_new,
                    report.sessions_read, report.payments_read, report.repaired
                );
                for failure in &report.failures {
                    println!("  left for the next run: {failure}");
                }
            }
            if report.failures.is_empty() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("the run failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::since;

    #[test]
    fn since_reads_durations_and_instants() {
        assert_eq!(since("3d", 1_000_000), Some(1_000_000 - 3 * 86_400));
        assert_eq!(since("12h", 100_000), Some(100_000 - 12 * 3600));
        assert_eq!(since("90m", 10_000), Some(10_000 - 5400));
        assert_eq!(since("1700000000", 5), Some(1_700_000_000));
        for bad in ["", "3w", "d", "-3d", "99999999999999999999d"] {
            assert_eq!(since(bad, 5), None, "{bad}");
        }
    }
}
