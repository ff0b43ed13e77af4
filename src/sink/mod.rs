//! Intent → effect: applying invalidations to Redis.

pub mod redis;
