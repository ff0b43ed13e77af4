//! Intent → effect: applying invalidations to Redis.

pub mod redelete;
pub mod redis;
pub mod tags;
