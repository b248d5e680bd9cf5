//! The client side, and the only layer that knows tiny_http: the server's start and
//! shutdown (`listen`), each request served on its connection's thread (`serve`), answers
//! written by hand (`http_out`), and the paths the proxy answers itself (`admin`).

pub mod admin;
pub mod http_out;
pub mod listen;
pub mod serve;
