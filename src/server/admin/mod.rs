//! The paths the proxy answers itself (`paths`): the admin API under `/__qcc__/`, routed in
//! `routes` once `access` admits the request, answered from snapshots (`stats`, `metrics`,
//! `logs`, the status page) as an `answer`; and `/favicon.ico` and `/robots.txt`.

pub mod access;
pub mod answer;
pub mod logfile;
pub mod logs;
pub mod metrics;
pub mod paths;
pub mod routes;
pub mod stats;
