//! The browser page (issue #13): a person signs in with a token, sees
//! their groups and clips, holds a button to talk and hears clips live.
//!
//! The page is static files embedded in the binary (`relay/web/`, plain ES
//! modules), served by [`http`] on the `web` listener together with
//! `config.json`, which tells the page the relay's UDP port and the hashes
//! of the certificate it presents to browsers ([`cert`]). The page then
//! opens a WebTransport session to `https://<host>:<port>/ptt`; the relay
//! accepts it on its QUIC endpoint beside native `ptt/1` connections
//! ([`crate::transport`]) and runs the same session code for both.

pub mod cert;
pub mod http;
