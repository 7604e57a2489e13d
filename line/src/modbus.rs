//! Modbus slave: the PDU logic over the register map (line-side.md §5.3), RTU framing (§5.1) and
//! the TCP MBAP wrapper (§5.2). Transport-free: the servers in [`super::server`] feed bytes in.

use super::status::{Coil, Registers};

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF); sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in data {
        crc ^= b as u16;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// A write the PDU asked for, applied by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Coil set (FC05/FC15).
    Coil(Coil, bool),
    /// Holding register written (FC06/FC16).
    Register(u16, u16),
}

const ILLEGAL_FUNCTION: u8 = 1;
/// Exception 02: the address is not in the map (or not writable in this configuration).
pub const ILLEGAL_ADDRESS: u8 = 2;
/// Exception 03: the value is refused (an unknown product id, a COMMAND value).
pub const ILLEGAL_VALUE: u8 = 3;
/// Exception 04: the server cannot do it now (PRODUCT_SELECT while Faulted or draining).
pub const DEVICE_FAILURE: u8 = 4;

fn exception(fc: u8, code: u8) -> Vec<u8> {
    vec![fc | 0x80, code]
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn pack_bits(bits: impl Iterator<Item = bool>, count: usize) -> Vec<u8> {
    let mut out = vec![0u8; count.div_ceil(8)];
    for (i, b) in bits.take(count).enumerate() {
        if b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// Answer one request PDU (function code + data) from `regs`; writes go to `apply`, which may
/// refuse one with an exception code (PRODUCT_SELECT: an unknown id is 03, a Faulted line 04).
/// Returns the response PDU (an exception response for bad requests).
pub fn handle_pdu(
    pdu: &[u8],
    regs: &Registers,
    mut apply: impl FnMut(Write) -> Result<(), u8>,
) -> Vec<u8> {
    let Some(&fc) = pdu.first() else {
        return exception(0, ILLEGAL_FUNCTION);
    };
    let d = &pdu[1..];
    match fc {
        1..=4 => {
            if d.len() != 4 {
                return exception(fc, ILLEGAL_VALUE);
            }
            let (start, count) = (be16(d) as usize, be16(&d[2..]) as usize);
            let max = if fc <= 2 { 2000 } else { 125 };
            if count == 0 || count > max {
                return exception(fc, ILLEGAL_VALUE);
            }
            match fc {
                1 | 2 => {
                    let bits: Option<Vec<bool>> = (start..start + count)
                        .map(|a| {
                            if fc == 1 {
                                regs.coil(a)
                            } else {
                                regs.discrete(a)
                            }
                        })
                        .collect();
                    let Some(bits) = bits else {
                        return exception(fc, ILLEGAL_ADDRESS);
                    };
                    let bytes = pack_bits(bits.into_iter(), count);
                    let mut out = vec![fc, bytes.len() as u8];
                    out.extend(bytes);
                    out
                }
                _ => {
                    let words: Option<Vec<u16>> = (start..start + count)
                        .map(|a| regs.register(a, fc == 3))
                        .collect();
                    let Some(words) = words else {
                        return exception(fc, ILLEGAL_ADDRESS);
                    };
                    let mut out = vec![fc, (count * 2) as u8];
                    for w in words {
                        out.extend(w.to_be_bytes());
                    }
                    out
                }
            }
        }
        5 => {
            if d.len() != 4 {
                return exception(fc, ILLEGAL_VALUE);
            }
            let value = match be16(&d[2..]) {
                0xFF00 => true,
                0x0000 => false,
                _ => return exception(fc, ILLEGAL_VALUE),
            };
            let Some(coil) = Coil::from_address(be16(d)) else {
                return exception(fc, ILLEGAL_ADDRESS);
            };
            if let Err(code) = apply(Write::Coil(coil, value)) {
                return exception(fc, code);
            }
            pdu.to_vec()
        }
        6 => {
            if d.len() != 4 {
                return exception(fc, ILLEGAL_VALUE);
            }
            let (addr, value) = (be16(d), be16(&d[2..]));
            if !Registers::writable(addr) {
                return exception(fc, ILLEGAL_ADDRESS);
            }
            if addr == 100 && !Registers::command_value(value) {
                return exception(fc, ILLEGAL_VALUE);
            }
            if let Err(code) = apply(Write::Register(addr, value)) {
                return exception(fc, code);
            }
            pdu.to_vec()
        }
        15 | 16 => {
            if d.len() < 5 {
                return exception(fc, ILLEGAL_VALUE);
            }
            let (start, count, n) = (be16(d), be16(&d[2..]) as usize, d[4] as usize);
            let ok_count = if fc == 15 {
                (1..=1968).contains(&count) && n == count.div_ceil(8)
            } else {
                (1..=123).contains(&count) && n == count * 2
            };
            if !ok_count || d.len() != 5 + n {
                return exception(fc, ILLEGAL_VALUE);
            }
            let data = &d[5..];
            if fc == 15 {
                let coils: Option<Vec<Coil>> = (0..count)
                    .map(|i| Coil::from_address(start.wrapping_add(i as u16)))
                    .collect();
                let Some(coils) = coils else {
                    return exception(fc, ILLEGAL_ADDRESS);
                };
                for (i, c) in coils.into_iter().enumerate() {
                    if let Err(code) = apply(Write::Coil(c, data[i / 8] & (1 << (i % 8)) != 0)) {
                        return exception(fc, code);
                    }
                }
            } else {
                if (0..count).any(|i| !Registers::writable(start.wrapping_add(i as u16))) {
                    return exception(fc, ILLEGAL_ADDRESS);
                }
                if (0..count).any(|i| {
                    start + i as u16 == 100 && !Registers::command_value(be16(&data[2 * i..]))
                }) {
                    return exception(fc, ILLEGAL_VALUE);
                }
                // PRODUCT_SELECT first: it is the one the line may refuse, and a refused
                // request must change nothing (COMMAND is applied only after it passed).
                let mut order: Vec<usize> = (0..count).collect();
                order.sort_by_key(|&i| start + i as u16 != 101);
                for i in order {
                    let w = Write::Register(start + i as u16, be16(&data[2 * i..]));
                    if let Err(code) = apply(w) {
                        return exception(fc, code);
                    }
                }
            }
            let mut out = vec![fc];
            out.extend(start.to_be_bytes());
            out.extend((count as u16).to_be_bytes());
            out
        }
        _ => exception(fc, ILLEGAL_FUNCTION),
    }
}

/// What the bytes at the start of `buf` say about the RTU request frame there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameLen {
    /// Too few bytes to tell.
    Unknown,
    /// A frame of this many bytes (address, function, …, CRC).
    Bytes(usize),
    /// No request can start here (a 15/16 header whose counts disagree): resynchronise.
    Impossible,
}

/// Length of the RTU request frame starting at `buf[0]`. A function 15/16 header is checked
/// before its byte count is trusted (count in range, byte count equal to what the count needs),
/// so that garbage cannot make the decoder wait for a long frame (line-side.md §5.1).
fn rtu_request_len(buf: &[u8]) -> FrameLen {
    let Some(&fc) = buf.get(1) else {
        return FrameLen::Unknown;
    };
    match fc {
        15 | 16 => {
            let (Some(c), Some(&n)) = (buf.get(4..6), buf.get(6)) else {
                return FrameLen::Unknown;
            };
            let count = u16::from_be_bytes([c[0], c[1]]) as usize;
            let ok = if fc == 15 {
                (1..=1968).contains(&count) && n as usize == count.div_ceil(8)
            } else {
                (1..=123).contains(&count) && n as usize == 2 * count
            };
            if ok {
                FrameLen::Bytes(9 + n as usize)
            } else {
                FrameLen::Impossible
            }
        }
        // Functions 1–6 and unknown ones: the common 8-byte shape; a CRC match of an unknown
        // function gets exception 01.
        _ => FrameLen::Bytes(8),
    }
}

/// True when a complete request with a good CRC starts at `buf[0]`.
fn complete_frame_at(buf: &[u8]) -> Option<usize> {
    match rtu_request_len(buf) {
        FrameLen::Bytes(len) if buf.len() >= len => {
            (buf[len - 2..len] == crc16(&buf[..len - 2]).to_le_bytes()).then_some(len)
        }
        _ => None,
    }
}

/// What the RTU decoder found in the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtuEvent {
    /// A complete, CRC-checked request: unit id and PDU.
    Request(u8, Vec<u8>),
    /// Bytes dropped while resynchronising (garbage, bad CRC).
    Dropped(usize),
}

/// RTU request decoder: frames by length and CRC; on a CRC failure one byte is dropped and the
/// search restarts (resynchronisation after garbage, line-side.md §5.1).
#[derive(Debug, Default)]
pub struct RtuDecoder {
    buf: Vec<u8>,
}

impl RtuDecoder {
    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        // A frame is at most 256 bytes: anything older cannot start a frame we still wait for.
        if self.buf.len() > 4096 {
            let cut = self.buf.len() - 512;
            self.buf.drain(..cut);
        }
    }

    /// Discard a partial frame (the line was silent for longer than a frame gap).
    pub fn silence(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        n
    }

    /// The next event, if the buffered bytes give one.
    ///
    /// While the frame at the head is still incomplete, the bytes behind it are searched for a
    /// complete request with a good CRC: when one is there, the head was garbage that only
    /// looked like a frame start, and it is dropped instead of swallowing the real request.
    pub fn next_event(&mut self) -> Option<RtuEvent> {
        let mut dropped = 0;
        let skip = |buf: &mut Vec<u8>, dropped: &mut usize, n: usize| {
            buf.drain(..n);
            *dropped += n;
        };
        loop {
            if self.buf.len() < 4 {
                return (dropped > 0).then_some(RtuEvent::Dropped(dropped));
            }
            match rtu_request_len(&self.buf) {
                FrameLen::Impossible => {
                    skip(&mut self.buf, &mut dropped, 1);
                    continue;
                }
                FrameLen::Bytes(len) if self.buf.len() >= len => {
                    if complete_frame_at(&self.buf).is_some() {
                        if dropped > 0 {
                            return Some(RtuEvent::Dropped(dropped));
                        }
                        let frame: Vec<u8> = self.buf.drain(..len).collect();
                        return Some(RtuEvent::Request(frame[0], frame[1..len - 2].to_vec()));
                    }
                    skip(&mut self.buf, &mut dropped, 1);
                    continue;
                }
                FrameLen::Unknown | FrameLen::Bytes(_) => {
                    // Incomplete head: a complete request further on proves it garbage.
                    match (1..self.buf.len()).find(|&i| complete_frame_at(&self.buf[i..]).is_some())
                    {
                        Some(i) => {
                            skip(&mut self.buf, &mut dropped, i);
                            continue;
                        }
                        None => return (dropped > 0).then_some(RtuEvent::Dropped(dropped)),
                    }
                }
            }
        }
    }
}

/// An RTU response frame for `unit` and `pdu`, CRC appended (low byte first).
pub fn rtu_frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(pdu.len() + 3);
    f.push(unit);
    f.extend_from_slice(pdu);
    let crc = crc16(&f);
    f.extend(crc.to_le_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_published_check_values() {
        assert_eq!(crc16(b"123456789"), 0x4B37);
        assert_eq!(crc16(&[0x01, 0x03, 0x08, 0x2B, 0x00, 0x02]), 0x63B6);
        assert_eq!(
            rtu_frame(1, &[0x03, 0x08, 0x2B, 0x00, 0x02])[6..],
            [0xB6, 0x63]
        );
    }

    #[test]
    fn decoder_resynchronises_after_garbage_and_bad_crc() {
        let good = rtu_frame(1, &[4, 0, 0, 0, 2]);
        let mut bad = good.clone();
        bad[7] ^= 0xFF;
        let mut d = RtuDecoder::default();
        d.push(&[0x55, 0xAA, 0x03]);
        d.push(&bad);
        d.push(&good);
        let mut requests = Vec::new();
        let mut dropped = 0;
        while let Some(e) = d.next_event() {
            match e {
                RtuEvent::Request(u, p) => requests.push((u, p)),
                RtuEvent::Dropped(n) => dropped += n,
            }
        }
        assert_eq!(requests, vec![(1, vec![4, 0, 0, 0, 2])]);
        assert_eq!(dropped, 3 + 8);
        // A frame split over reads is assembled.
        let f16 = rtu_frame(7, &[16, 0, 100, 0, 1, 2, 0, 1]);
        d.push(&f16[..5]);
        assert_eq!(d.next_event(), None);
        d.push(&f16[5..]);
        assert_eq!(
            d.next_event(),
            Some(RtuEvent::Request(7, vec![16, 0, 100, 0, 1, 2, 0, 1]))
        );
    }

    /// M7: garbage that starts like a function 16 frame with a large byte count must not hold
    /// back the valid request right behind it.
    #[test]
    fn garbage_that_looks_like_a_long_frame_does_not_swallow_the_next_request() {
        let good = rtu_frame(1, &[4, 0, 0, 0, 2]);
        for garbage in [
            // Consistent header (count 100, 200 bytes) that never completes.
            vec![0x01, 0x10, 0x00, 0x64, 0x00, 0x64, 0xC8],
            // Inconsistent header (count 1, byte count 250).
            vec![0x01, 0x10, 0x00, 0x64, 0x00, 0x01, 0xFA],
            vec![0x05, 0x0F, 0x00, 0x00, 0x07, 0xB0, 0xF6],
        ] {
            let mut d = RtuDecoder::default();
            d.push(&garbage);
            d.push(&good);
            let mut requests = Vec::new();
            while let Some(e) = d.next_event() {
                if let RtuEvent::Request(u, p) = e {
                    requests.push((u, p));
                }
            }
            assert_eq!(requests, vec![(1, vec![4, 0, 0, 0, 2])], "{garbage:02x?}");
        }
    }

    /// COMMAND takes 1–4 only; PRODUCT_SELECT (101) reads the active id and passes writes to
    /// the line, whose refusal becomes the exception; 102 is no register.
    #[test]
    fn command_register_refuses_unknown_values_and_addresses() {
        let regs = crate::status::Status::default().registers();
        let mut writes = Vec::new();
        let mut apply = |w: Write| {
            writes.push(w);
            match w {
                Write::Register(101, 1) => Ok(()),
                Write::Register(101, _) => Err(ILLEGAL_VALUE),
                _ => Ok(()),
            }
        };
        assert_eq!(
            handle_pdu(&[6, 0, 100, 0, 2], &regs, &mut apply),
            vec![6, 0, 100, 0, 2]
        );
        assert_eq!(
            handle_pdu(&[6, 0, 100, 0, 9], &regs, &mut apply),
            vec![0x86, 3]
        );
        assert_eq!(
            handle_pdu(&[6, 0, 101, 0, 1], &regs, &mut apply),
            vec![6, 0, 101, 0, 1]
        );
        assert_eq!(
            handle_pdu(&[6, 0, 101, 0, 9], &regs, &mut apply),
            vec![0x86, 3]
        );
        assert_eq!(
            handle_pdu(&[6, 0, 102, 0, 1], &regs, &mut apply),
            vec![0x86, 2]
        );
        assert_eq!(
            handle_pdu(&[3, 0, 101, 0, 1], &regs, &mut apply),
            vec![3, 2, 0, 1]
        );
        // FC16 over COMMAND and PRODUCT_SELECT: PRODUCT_SELECT first, and its refusal leaves
        // COMMAND unapplied (a refused request changes nothing).
        assert_eq!(
            handle_pdu(&[16, 0, 100, 0, 2, 4, 0, 3, 0, 5], &regs, &mut apply),
            vec![0x90, 3]
        );
        assert_eq!(
            writes,
            vec![
                Write::Register(100, 2),
                Write::Register(101, 1),
                Write::Register(101, 9),
                Write::Register(101, 5),
            ]
        );
    }
}
