//! deltaboxd started for one test (filled in with the daemon tests).
