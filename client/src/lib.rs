//! A client of the push-to-talk relay that a mobile app can embed: connect,
//! authenticate, talk, and receive clips live and from the store.
