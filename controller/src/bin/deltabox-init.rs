//! (being written this session)
fn main() {}
