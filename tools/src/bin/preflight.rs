//! The deployment checklist: `preflight [--online] [--json]`, reading the environment (load your
//! deployment's env file first, e.g. `set -a; . deploy/production.env; set +a`). Exit code 1 when
//! any item fails.

use tools::preflight::{self, Status};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| !matches!(a.as_str(), "--online" | "--json"))
    {
        eprintln!("usage: preflight [--online] [--json]");
        return std::process::ExitCode::from(2);
    }
    let online = args.iter().any(|a| a == "--online");
    let json = args.iter().any(|a| a == "--json");
    let lookup = |k: &str| std::env::var(k).ok();
    let checks = preflight::run(&lookup, online).await;
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if json {
        let doc = serde_json::json!({"ok": failed == 0, "online": online, "checks": checks});
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for check in &checks {
            let mark = match check.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            println!("[{mark}] {}: {}", check.name, check.detail);
            if !check.fix.is_empty() {
                println!("       fix: {}", check.fix);
            }
        }
        let passed = checks.iter().filter(|c| c.status == Status::Pass).count();
        let skipped = checks.iter().filter(|c| c.status == Status::Skip).count();
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    }
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
