//! The push-to-talk relay server as a library, so that tests and
//! `client-sim --embedded` can start it in-process.
//!
//! Start one with [`server::start`] (returns a [`server::RelayHandle`]) or
//! [`server::run`] (runs until a shutdown future completes). The modules:
//! - [`server`]: accept loop, limits, shutdown.
//! - [`session`]: one task per connection.
//! - [`ingest`]: a talker's clip upload.
//! - [`delivery`]: writing clips to members.
//! - [`live`]: the shared frame buffer of a clip in flight.
//! - [`fanout`]: the fan-out interface; [`hub`]: its single-node implementation.
//! - [`store`]: durable storage behind the [`store::ClipStore`] trait.
//! - [`auth`], [`tls`], [`net`], [`config`], [`admin`].

pub mod admin;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod fanout;
pub mod floor;
pub mod hub;
pub mod ingest;
pub mod live;
pub mod net;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

pub use config::RelayConfig;
pub use server::{RelayHandle, StartError, run, start};
