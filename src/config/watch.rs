//! Config file watcher (filled in below).
