//! Primitive encodings shared by every message: QUIC variable-length
//! integers, length-prefixed byte strings and UTF-8 strings, and the
//! defensive readers that decode them from untrusted input.
//!
//! Every length read from the wire is checked against a cap and against the
//! bytes actually present before anything is allocated (the rule of moq-rs's
//! `coding/decode.rs`).

use bytes::{Buf, BufMut, Bytes};

use crate::error::DecodeError;

/// The largest value a QUIC variable-length integer can hold (2^62 - 1).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Appends `value` as a QUIC variable-length integer (RFC 9000, section 16).
///
/// # Panics
/// If `value` exceeds [`VARINT_MAX`]; every caller in this crate encodes
/// values that are bounded well below it (lengths, counters, millisecond
/// timestamps).
pub fn put_varint(buf: &mut impl BufMut, value: u64) {
    if value < 1 << 6 {
        buf.put_u8(value as u8);
    } else if value < 1 << 14 {
        buf.put_u16(0x4000 | value as u16);
    } else if value < 1 << 30 {
        buf.put_u32(0x8000_0000 | value as u32);
    } else {
        assert!(value <= VARINT_MAX, "varint out of range: {value}");
        buf.put_u64(0xc000_0000_0000_0000 | value);
    }
}

/// The number of bytes [`put_varint`] writes for `value`.
pub fn varint_len(value: u64) -> usize {
    match value {
        v if v < 1 << 6 => 1,
        v if v < 1 << 14 => 2,
        v if v < 1 << 30 => 4,
        _ => 8,
    }
}

/// Reads a QUIC variable-length integer.
pub fn get_varint(buf: &mut impl Buf) -> Result<u64, DecodeError> {
    if !buf.has_remaining() {
        return Err(DecodeError::Short);
    }
    let first = buf.chunk()[0];
    let len = 1usize << (first >> 6);
    if buf.remaining() < len {
        return Err(DecodeError::Short);
    }
    let value = match len {
        1 => u64::from(buf.get_u8()),
        2 => u64::from(buf.get_u16() & 0x3fff),
        4 => u64::from(buf.get_u32() & 0x3fff_ffff),
        _ => buf.get_u64() & 0x3fff_ffff_ffff_ffff,
    };
    Ok(value)
}

/// Reads a varint that must fit a `u32`.
pub fn get_varint_u32(buf: &mut impl Buf, field: &'static str) -> Result<u32, DecodeError> {
    let value = get_varint(buf)?;
    u32::try_from(value).map_err(|_| DecodeError::OutOfRange { field, value })
}

/// Reads one byte.
pub fn get_u8(buf: &mut impl Buf) -> Result<u8, DecodeError> {
    if !buf.has_remaining() {
        return Err(DecodeError::Short);
    }
    Ok(buf.get_u8())
}

/// Appends a byte string prefixed by its varint length.
pub fn put_bytes(buf: &mut impl BufMut, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

/// Reads a varint-length-prefixed byte string of at most `cap` bytes, sharing
/// the input's memory when it is a [`Bytes`].
pub fn get_bytes(buf: &mut Bytes, cap: usize, field: &'static str) -> Result<Bytes, DecodeError> {
    let len = get_varint(buf)?;
    if len > cap as u64 {
        return Err(DecodeError::TooLong { field, len, cap });
    }
    let len = len as usize;
    if buf.remaining() < len {
        return Err(DecodeError::Short);
    }
    Ok(buf.split_to(len))
}

/// Appends a UTF-8 string prefixed by its varint length.
pub fn put_string(buf: &mut impl BufMut, s: &str) {
    put_bytes(buf, s.as_bytes());
}

/// Reads a varint-length-prefixed UTF-8 string of at most `cap` bytes.
pub fn get_string(buf: &mut Bytes, cap: usize, field: &'static str) -> Result<String, DecodeError> {
    let bytes = get_bytes(buf, cap, field)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field })
}

/// Reads exactly `N` bytes.
pub fn get_array<const N: usize>(buf: &mut impl Buf) -> Result<[u8; N], DecodeError> {
    if buf.remaining() < N {
        return Err(DecodeError::Short);
    }
    let mut out = [0u8; N];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

/// Reads a list length and checks it against `cap` and against the bytes
/// left (each element takes at least `min_element_len` bytes), so that a
/// forged count cannot make the caller preallocate.
pub fn get_count(
    buf: &mut impl Buf,
    cap: usize,
    min_element_len: usize,
    field: &'static str,
) -> Result<usize, DecodeError> {
    let count = get_varint(buf)?;
    if count > cap as u64 {
        return Err(DecodeError::TooLong {
            field,
            len: count,
            cap,
        });
    }
    if count as usize * min_element_len.max(1) > buf.remaining() {
        return Err(DecodeError::Short);
    }
    Ok(count as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn varint_round_trips_at_every_width_boundary() {
        for value in [
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            VARINT_MAX,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), varint_len(value), "{value}");
            let mut bytes = buf.freeze();
            assert_eq!(get_varint(&mut bytes).unwrap(), value);
            assert!(bytes.is_empty());
        }
    }

    #[test]
    fn rfc9000_examples_decode() {
        // RFC 9000, appendix A.1.
        let cases: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (wire, value) in cases {
            let mut bytes = Bytes::copy_from_slice(wire);
            assert_eq!(get_varint(&mut bytes).unwrap(), value);
        }
    }

    #[test]
    fn short_and_oversized_inputs_are_errors() {
        let mut bytes = Bytes::from_static(&[0x40]);
        assert_eq!(get_varint(&mut bytes), Err(DecodeError::Short));
        // A string claiming 1 MiB inside a 3-byte buffer.
        let mut bytes = Bytes::from_static(&[0x80, 0x10, 0x00, 0x00, b'a']);
        assert!(matches!(
            get_string(&mut bytes, 100, "name"),
            Err(DecodeError::TooLong { .. })
        ));
        let mut bytes = Bytes::from_static(&[0x05, b'a']);
        assert_eq!(get_bytes(&mut bytes, 100, "data"), Err(DecodeError::Short));
        let mut bytes = Bytes::from_static(&[0x02, 0xff, 0xfe]);
        assert_eq!(
            get_string(&mut bytes, 100, "name"),
            Err(DecodeError::InvalidUtf8 { field: "name" })
        );
    }
}
