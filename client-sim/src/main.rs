//! `client-sim`: plays many push-to-talk clients against a relay and verifies
//! that every clip reached every member exactly once.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("client-sim: not implemented yet")
}
