//! Embeds the list of migration versions, so `preflight --online` knows the newest one.
fn main() {
    // The variable as this run of the build script sees it, not as it was when the script was
    // compiled: a target/ copied from another checkout would read that checkout's migrations.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let dir = std::path::Path::new(&manifest_dir).join("../supabase/migrations");
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
