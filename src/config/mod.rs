//! The config: the file read, parsed raw and validated (`load`) into the `Config` the rest
//! of the program sees (`validated`), the per-model `prices`, and the `Secret` type that keys
//! and tokens travel in.

pub mod load;
pub mod prices;
pub mod secret;
pub mod validated;
