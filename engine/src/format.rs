//! On-disk formats of the store, each documented in its module and frozen
//! by golden tests: chunk files ([`chunk`]), the packs that hold them
//! ([`pack`]), index pages ([`index`]) and snapshot manifests ([`manifest`]).

pub mod chunk;
pub mod index;
pub mod manifest;
pub mod pack;
