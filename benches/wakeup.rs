//! Placeholder: the wake-up benchmark is being written.
fn main() {}
