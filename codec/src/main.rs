//! The `codec` command line: encode, decode and inspect voice clips.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("codec: not implemented yet")
}
