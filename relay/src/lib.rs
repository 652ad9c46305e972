//! The push-to-talk relay server as a library, so that tests and
//! `client-sim --embedded` can start it in-process.
