//! Embeds the list of migration versions, so `preflight --online` knows the newest one.
fn main() {
    // Read when the script runs, not when it was compiled: a build script compiled in another
    // checkout (a copied target/) would otherwise list that checkout's migrations.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let dir = std::path::Path::new(&manifest).join("../supabase/migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| name.ends_with(".sql"))
                .filter_map(|name| name.split('_').next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    let out =
        std::path::Path::new(&std::env::var("OUT_DIR").unwrap_or_default()).join("migrations.rs");
    let body = format!("/// Migration versions in this build, oldest first.\npub const MIGRATIONS: &[&str] = &{versions:?};\n");
    std::fs::write(out, body).unwrap_or_else(|e| panic!("write migrations.rs: {e}"));
}
