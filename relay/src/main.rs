//! The `relay` command line: serve, issue tokens, administer groups.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("relay: not implemented yet")
}
