//! The io_uring reader: up to `depth` chunk reads in flight on one ring;
//! each buffer is owned by its slot until its completion is reaped.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::{chunk_span, ReadError, ReadJob};

pub(super) fn available() -> bool {
    let Ok(mut ring) = IoUring::new(2) else {
        return false;
    };
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP references no memory.
    if unsafe { ring.submission().push(&nop) }.is_err() {
        return false;
    }
    if ring.submit_and_wait(1).is_err() {
        return false;
    }
    let r = ring.completion().next().map(|c| c.result());
    matches!(r, Some(x) if x >= 0)
}

struct Slot {
    idx: u64,
    off: u64,
    buf: Vec<u8>,
    done: usize,
}

pub(super) fn read<E>(
    job: &ReadJob<'_>,
    sink: &mut dyn FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    let depth = job.depth.clamp(1, 256);
    let mut ring = IoUring::new(depth.next_power_of_two() as u32).map_err(ReadError::Io)?;
    let fd = types::Fd(job.file.as_raw_fd());
    let mut slots: Vec<Option<Slot>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut todo = job.ranges.iter().flat_map(|r| r.clone());
    let mut inflight = 0usize;
    let mut exhausted = false;
    let mut failure: Option<ReadError<E>> = None;

    let submit = |ring: &mut IoUring, slot: usize, s: &mut Slot| -> io::Result<()> {
        let rest = &mut s.buf[s.done..];
        let e = opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
            .offset(s.off + s.done as u64)
            .build()
            .user_data(slot as u64);
        // SAFETY: the entry points into `s.buf`, owned by `slots[slot]`,
        // which is neither moved nor dropped until this entry's completion
        // is reaped below (we always drain completions before returning).
        while unsafe { ring.submission().push(&e) }.is_err() {
            ring.submit()?;
        }
        Ok(())
    };

    loop {
        while failure.is_none() && !exhausted && !free.is_empty() {
            match todo.next() {
                None => exhausted = true,
                Some(idx) => {
                    let slot = free.pop().expect("checked non-empty");
                    let (off, len) = chunk_span(job, idx);
                    let s = slots[slot].insert(Slot {
                        idx,
                        off,
                        buf: super::buffer(job, len),
                        done: 0,
                    });
                    if let Err(e) = submit(&mut ring, slot, s) {
                        failure = Some(ReadError::Io(e));
                    }
                    inflight += 1;
                }
            }
        }
        if inflight == 0 {
            break;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                failure.get_or_insert(ReadError::Io(e));
                // Without the kernel's help we cannot know the buffers are
                // free; keep waiting for them.
                std::thread::yield_now();
            }
            continue;
        }
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, res) in done {
            let s = slots[slot].as_mut().expect("slot in flight");
            if res == -libc::EINTR || res == -libc::EAGAIN {
                if let Err(e) = submit(&mut ring, slot, s) {
                    failure.get_or_insert(ReadError::Io(e));
                } else {
                    continue;
                }
            } else if res < 0 {
                failure.get_or_insert(ReadError::Io(io::Error::from_raw_os_error(-res)));
            } else if res == 0 {
                failure.get_or_insert(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "image shrank while it was read",
                )));
            } else {
                s.done += res as usize;
                if s.done < s.buf.len() {
                    match submit(&mut ring, slot, s) {
                        Ok(()) => continue,
                        Err(e) => {
                            failure.get_or_insert(ReadError::Io(e));
                        }
                    }
                }
            }
            let s = slots[slot].take().expect("slot in flight");
            inflight -= 1;
            free.push(slot);
            if failure.is_none() && s.done == s.buf.len() {
                if let Err(e) = sink(s.idx, s.buf) {
                    failure = Some(ReadError::Sink(e));
                }
            }
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}
