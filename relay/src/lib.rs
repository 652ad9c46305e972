//! The push-to-talk relay server as a library, so that tests and
//! `client-sim --embedded` can start it in-process.
//!
//! Start one with [`server::start`] (returns a [`server::RelayHandle`]) or
//! [`server::run`] (runs until a shutdown future completes). The modules:
//! - [`server`]: accept loop, limits, shutdown; [`context`]: what
//!   connection tasks share.
//! - [`session`]: one task per connection, a module per control message.
//! - [`subscription`]: a member's subscription to a group (sans-IO).
//! - [`ingest`]: a talker's clip upload.
//! - [`delivery`]: writing clips to members; [`live`]: the shared frame
//!   buffer of a clip in flight; [`media`]: the UDP media path (live
//!   frames sealed per member, sent by the talker's task).
//! - The seams, each with its single-node implementation: [`log`] (each
//!   group's ordered clips, membership changes, live clips of other
//!   nodes), [`floor`] (the floor arbiter), [`store`] (groups, members,
//!   cursors).
//! - [`hub`]: the node's live plane over the log; [`command`]: what it asks
//!   sessions to do.
//! - [`nats`]: the three seams on NATS JetStream, for several relay nodes
//!   (`[cluster]`, `relay serve --nats`).
//! - [`auth`], [`tls`], [`net`], [`config`], [`admin`]; [`metrics`]
//!   (Prometheus, `/healthz`, `/readyz`); [`limits`]: what one address or
//!   user may cost across connections.
//! - [`transport`]: the seam that lets native QUIC and WebTransport
//!   connections share the session code; [`web`]: the browser page, its
//!   HTTP listener and certificates.

pub mod admin;
pub mod auth;
pub mod command;
pub mod config;
pub mod context;
pub mod delivery;
pub mod floor;
pub mod hub;
pub mod ingest;
pub mod limits;
pub mod live;
pub mod log;
pub mod media;
pub mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
pub mod net;
pub mod server;
pub mod session;
pub mod store;
pub mod subscription;
pub mod tls;
pub mod transport;
pub mod web;

pub use config::RelayConfig;
pub use server::{RelayHandle, StartError, run, start};
