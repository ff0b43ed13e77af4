//! Wire → domain: the replication connection, its frames, the pgoutput decoder, the
//! relation cache and the conversion into `RowEvent`s; plus the catalog queries made
//! on the ordinary control connection.

pub mod catalog;
pub mod conn;
pub mod event;
pub mod pgoutput;
pub mod protocol;
pub mod relation;
pub mod source;
pub mod tls;
