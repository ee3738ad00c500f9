//! `deltafs`: the DeltaFS daemon for harnesses (work in progress).

fn main() {}
