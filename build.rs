//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds the files of
//! `migrations/` at compile time, but cargo only notices changes to files it already knew.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
