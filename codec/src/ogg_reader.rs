//! Reading Ogg: pages in, the packets of one logical stream out, with every
//! packet's size checked against a bound *before* its bytes are buffered.
//!
//! The `ogg` crate's [`PacketReader`](ogg::PacketReader) glues a packet that
//! spans pages together for as long as the input keeps continuing it, so a
//! hostile file could make one "packet" as large as the file. Here the pages
//! are read one at a time: the page header and its lacing values (at most
//! 255 bytes) come first, and the length of every packet the page completes
//! or continues is known from them before the body (at most 65,025 bytes) is
//! read. A packet longer than the caller's bound is refused at that point.
//! The `ogg` crate still parses each page and checks its CRC
//! ([`PageParser`]), and assembles the packets ([`BasePacketReader`]).
//!
//! Only the first logical stream is kept: pages of any other serial number
//! (a multiplexed or chained stream) are read past without being buffered.
//! The framing is strict: bytes between pages are an error, and a page cut
//! short at the end of the input ends the stream there (what was complete
//! is kept, as with a missing end-of-stream page).

use std::io::Read;

use ogg::Packet;
use ogg::reading::{BasePacketReader, PageParser};

use crate::CodecError;
use crate::wav::read_up_to;

/// Length of an Ogg page header before its lacing values.
const PAGE_HEADER_LEN: usize = 27;

/// The packets of the first logical stream of an Ogg physical stream.
pub(crate) struct OggPacketReader<R> {
    reader: R,
    packets: BasePacketReader,
    /// Serial number of the stream being read, once its first page is seen.
    serial: Option<u32>,
    /// Bytes of this stream's packet left unfinished at the end of the last
    /// page (continued on the next one).
    unfinished: usize,
    /// Bytes read from the input so far (to place errors).
    offset: u64,
}

impl<R: Read> OggPacketReader<R> {
    /// A reader over `reader`, positioned at the first page.
    pub(crate) fn new(reader: R) -> Self {
        OggPacketReader {
            reader,
            packets: BasePacketReader::new(),
            serial: None,
            unfinished: 0,
            offset: 0,
        }
    }

    /// The next packet of the stream, or `None` at the end of the input.
    ///
    /// A packet longer than `max_len` bytes is refused with
    /// [`CodecError::PacketTooLarge`] (naming it `what`) as soon as its
    /// pages' lacing values show it, before its body is read.
    pub(crate) fn next_packet(
        &mut self,
        max_len: usize,
        what: &'static str,
    ) -> Result<Option<Packet>, CodecError> {
        loop {
            if let Some(packet) = self.packets.read_packet() {
                // A packet read under an earlier, larger bound (a header
                // page that also starts audio) is checked again here.
                if packet.data.len() > max_len {
                    return Err(CodecError::PacketTooLarge { what, max: max_len });
                }
                return Ok(Some(packet));
            }
            if !self.read_page(max_len, what)? {
                return Ok(None);
            }
        }
    }

    /// Reads pages until one of this stream's is handed to the packet
    /// assembler; `false` at the end of the input.
    fn read_page(&mut self, max_len: usize, what: &'static str) -> Result<bool, CodecError> {
        loop {
            let page_at = self.offset;
            let mut header = [0u8; PAGE_HEADER_LEN];
            if !self.fill(&mut header)? {
                return Ok(false);
            }
            if &header[..4] != b"OggS" {
                return Err(CodecError::Ogg(format!("no Ogg page at byte {page_at}")));
            }
            let serial = u32::from_le_bytes([header[14], header[15], header[16], header[17]]);
            let continues_packet = header[5] & 0x01 != 0;
            let (mut parser, segment_count) = PageParser::new(header)?;
            // At most 255 lacing values, from a u8 count.
            let mut lacing = vec![0u8; segment_count];
            if !self.fill(&mut lacing)? {
                return Ok(false);
            }
            let ours = *self.serial.get_or_insert(serial) == serial;
            if ours {
                // Sizes of the packets this page ends or continues.
                let mut run = if continues_packet { self.unfinished } else { 0 };
                for &value in &lacing {
                    run += usize::from(value);
                    if run > max_len {
                        return Err(CodecError::PacketTooLarge { what, max: max_len });
                    }
                    if value < 255 {
                        run = 0;
                    }
                }
                self.unfinished = run;
            }
            // At most 255 × 255 = 65,025 bytes.
            let mut body = vec![0u8; parser.parse_segments(lacing)];
            if !self.fill(&mut body)? {
                return Ok(false);
            }
            if !ours {
                continue;
            }
            let page = parser.parse_packet_data(body)?;
            self.packets.push_page(page)?;
            return Ok(true);
        }
    }

    /// Fills `buf` from the input; `false` if the input ends first.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, CodecError> {
        let n = read_up_to(&mut self.reader, buf)?;
        self.offset += n as u64;
        Ok(n == buf.len())
    }
}
