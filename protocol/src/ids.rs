//! Identifiers and small enums that several messages share.

use std::fmt;

/// A clip's id, chosen by the talker (random 16 bytes, like a UUID). The
/// relay stores a clip id once per group, so a talker that retries an upload
/// after a network switch reuses it and the clip is not duplicated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClipId([u8; 16]);

impl ClipId {
    /// Wraps 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> ClipId {
        ClipId(bytes)
    }

    /// The 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses 32 hexadecimal digits.
    pub fn from_hex(s: &str) -> Option<ClipId> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ClipId(out))
    }
}

impl fmt::Display for ClipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClipId({self})")
    }
}

/// How a group shares the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GroupMode {
    /// One talker at a time: ask for the floor before talking.
    Walkie = 1,
    /// Anyone may record at any time, several at once (voice notes).
    Notes = 2,
}

impl GroupMode {
    /// The mode for its wire number.
    pub fn from_u8(v: u8) -> Option<GroupMode> {
        match v {
            1 => Some(GroupMode::Walkie),
            2 => Some(GroupMode::Notes),
            _ => None,
        }
    }

    /// The mode's name in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            GroupMode::Walkie => "walkie",
            GroupMode::Notes => "notes",
        }
    }
}

impl std::str::FromStr for GroupMode {
    type Err = String;

    fn from_str(s: &str) -> Result<GroupMode, String> {
        match s {
            "walkie" => Ok(GroupMode::Walkie),
            "notes" => Ok(GroupMode::Notes),
            other => Err(format!("unknown group mode {other:?} (walkie or notes)")),
        }
    }
}

impl fmt::Display for GroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks a group or user id: 1 to 64 bytes of ASCII letters, digits and
/// `-_.@`, so ids are safe in logs, file names and NATS subjects.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= crate::message::MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_id_hex_round_trips() {
        let id = ClipId::from_bytes([0xab; 16]);
        assert_eq!(ClipId::from_hex(&id.to_string()), Some(id));
        assert_eq!(ClipId::from_hex("zz"), None);
    }

    #[test]
    fn ids_are_checked() {
        assert!(is_valid_id("team-1.ops@x"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id(&"a".repeat(65)));
    }
}
