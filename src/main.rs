//! The `troupe` command-line binary.

fn main() {}
