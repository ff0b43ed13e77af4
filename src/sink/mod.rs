//! Intent → effect: applying invalidations to Redis.
//!
//! [`Sink`] is the seam the pipeline hands its work through: Redis ([`redis::RedisSink`])
//! is the first implementation; Redis Cluster and the message-queue sinks plug in here.

use std::fmt::Display;
use std::future::Future;

use crate::rules::invalidation::{Event, Work};

pub mod amqp;
pub mod events;
pub mod fence;
pub mod nats;
pub mod redelete;
pub mod redis;
pub mod replay;
pub mod tags;

/// Where a unit of work ([`Work`] and the entity events of its
/// transactions, as JSON) goes, with an at-least-once contract: a unit counts as
/// delivered only once the sink acknowledged it, and a unit whose delivery failed is
/// delivered again (in whole: every operation in it must be safe to repeat).
///
/// The pipeline acknowledges units to PostgreSQL in the order it handed them over,
/// whatever order the sink finishes them in.
pub trait Sink: Send + 'static {
    /// Why a unit sent without waiting failed.
    type Error: Display + Send + 'static;

    /// Starts delivering a unit that commutes with every other such unit (here: keys
    /// deleted and TTLs lowered, nothing else), without waiting for the units before
    /// it. `None` when the unit does not commute, or the sink cannot send without
    /// waiting now: then use [`Sink::deliver`]. Returns, with the future that ends when
    /// the sink acknowledged (or failed), the generation of the connection it went on.
    fn send_commuting(
        &self,
        work: &Work,
        events: &[Event],
    ) -> Option<(
        u64,
        impl Future<Output = Result<(), Self::Error>> + Send + 'static,
    )>;

    /// Delivers a unit alone, retrying until the sink acknowledged it. Never gives up:
    /// an outage means waiting.
    fn deliver(&mut self, work: &Work, events: &[Event]) -> impl Future<Output = ()> + Send;

    /// A unit sent on connection `generation` failed: drop that connection so the
    /// retry starts afresh. True when it was still the current one.
    fn discard_connection(&mut self, generation: u64) -> bool;
}
