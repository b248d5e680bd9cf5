//! The paths the proxy answers itself: the admin API under `/__qcc__/`, its access rule,
//! the stats, metrics, logs and status page, and `/favicon.ico` and `/robots.txt`.

pub mod logfile;
pub mod metrics;
pub mod routes;
