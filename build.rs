//! Rebuilds the library when a migration is added or changed: `sqlx::migrate!` embeds the
//! directory, but on a stable compiler it cannot tell cargo to watch it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
