//! The `troupe` binary; a stub until the CLI lands.

fn main() {}
