//! Platform devices the core emulates.
