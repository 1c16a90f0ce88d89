//! The optional eBPF probe that records writes to raw block devices into the
//! engine's CBT bitmap. Kept out of the default workspace members so that a
//! plain `cargo build` needs neither clang nor libbpf. Not built yet: it is
//! the subject of a later issue.
