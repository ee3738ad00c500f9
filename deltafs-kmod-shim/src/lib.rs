//! DeltaFS.
