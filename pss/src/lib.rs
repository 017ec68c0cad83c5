//! wayside's persistent storage service (PSS): Raft-replicated block store on sled.

pub mod config;
