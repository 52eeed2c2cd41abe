//! troupe

pub mod testing;
