//! Transmission-phase replies: simple replies for clients that did not
//! negotiate structured replies (the Linux kernel client), structured chunks
//! otherwise. Read replies are built in place: the caller reserves
//! [`read_header_len`] bytes in front of the data buffer and fills them with
//! [`write_read_header`], so read data is never copied.

use super::consts::*;
use super::NbdError;

/// Bytes in front of the data of a successful read reply.
pub fn read_header_len(structured: bool) -> usize {
    if structured {
        20 + 8
    } else {
        16
    }
}

/// Fills `hdr` (exactly [`read_header_len`] bytes) for a successful read of
/// `len` bytes at `offset`.
pub fn write_read_header(hdr: &mut [u8], structured: bool, cookie: u64, offset: u64, len: u32) {
    if structured {
        chunk_header_into(
            &mut hdr[..20],
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            cookie,
            8 + len,
        );
        hdr[20..28].copy_from_slice(&offset.to_be_bytes());
    } else {
        simple_into(&mut hdr[..16], cookie, 0);
    }
}

/// Appends a reply that reports success without data.
pub fn ok(out: &mut Vec<u8>, cookie: u64) {
    let mut h = [0u8; 16];
    simple_into(&mut h, cookie, 0);
    out.extend_from_slice(&h);
}

/// Appends a structured NBD_REPLY_TYPE_NONE chunk with the done flag: the
/// whole reply to a read of no bytes, which no data chunk may carry.
pub fn none_done(out: &mut Vec<u8>, cookie: u64) {
    let mut h = [0u8; 20];
    chunk_header_into(&mut h, chunk::FLAG_DONE, chunk::NONE, cookie, 0);
    out.extend_from_slice(&h);
}

/// Appends an error reply: a structured ERROR chunk with a message when
/// structured replies are on, else a simple reply with the error number.
pub fn error(out: &mut Vec<u8>, structured: bool, cookie: u64, err: NbdError, msg: &str) {
    if structured {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        let mut h = [0u8; 20];
        chunk_header_into(
            &mut h,
            chunk::FLAG_DONE,
            chunk::ERROR,
            cookie,
            6 + msg.len() as u32,
        );
        out.extend_from_slice(&h);
        out.extend_from_slice(&(err as u32).to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
    } else {
        let mut h = [0u8; 16];
        simple_into(&mut h, cookie, err as u32);
        out.extend_from_slice(&h);
    }
}

/// Appends one BLOCK_STATUS chunk for context `id` with `(length, flags)`
/// extents; `done` marks the last chunk of the reply.
pub fn block_status(out: &mut Vec<u8>, cookie: u64, id: u32, extents: &[(u32, u32)], done: bool) {
    let mut h = [0u8; 20];
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    let len = 4 + 8 * extents.len() as u32;
    chunk_header_into(&mut h, flags, chunk::BLOCK_STATUS, cookie, len);
    out.extend_from_slice(&h);
    out.extend_from_slice(&id.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

fn simple_into(h: &mut [u8], cookie: u64, err: u32) {
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&err.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
}

fn chunk_header_into(h: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_replies() {
        let mut v = Vec::new();
        ok(&mut v, 0x0102);
        assert_eq!(
            v,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        v.clear();
        error(&mut v, true, 5, NbdError::Inval, "no");
        assert_eq!(&v[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&v[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(&v[16..20], &8u32.to_be_bytes());
        assert_eq!(&v[20..], &[0, 0, 0, 22, 0, 2, b'n', b'o']);
        v.clear();
        block_status(&mut v, 5, 2, &[(4096, 1)], true);
        assert_eq!(&v[6..8], &5u16.to_be_bytes());
        assert_eq!(&v[20..], &[0, 0, 0, 2, 0, 0, 16, 0, 0, 0, 0, 1]);
        let mut h = [0u8; 28];
        write_read_header(&mut h, true, 9, 512, 100);
        assert_eq!(&h[16..20], &108u32.to_be_bytes());
        assert_eq!(&h[20..28], &512u64.to_be_bytes());
    }
}
