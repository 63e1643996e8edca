//! Integration tests of the `graph` crate's public API, on fixtures in Microsoft's shape.

mod notification;
mod secret;
mod subscription;
mod time;
mod validation;

/// The text of `tests/fixtures/{name}`.
pub fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
