//! The positional-I/O engine, for kernels without io_uring: the connection
//! thread reads and decodes requests; a few workers per connection do
//! pread/pwrite/fdatasync and send replies as each finishes, so replies
//! still go out of order.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use bytes::BytesMut;

use super::session::{Next, Session, Work};
use super::Conn;

const WORKERS: usize = 4;
const READ_CHUNK: usize = 256 * 1024;

pub(super) fn run(conn: &Conn, session: &Session, mut rbuf: BytesMut) -> io::Result<()> {
    let writer = Mutex::new(conn.try_clone()?);
    let send = |bytes: &[u8]| {
        let w = writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = (&*w).write_all(bytes) {
            tracing::debug!("reply not sent: {e}");
        }
    };
    let (tx, rx) = crossbeam_channel::bounded::<Work>(64);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            let rx = rx.clone();
            s.spawn(move || {
                for w in rx {
                    send(&execute(session, w));
                }
            });
        }
        let mut tmp = vec![0u8; READ_CHUNK];
        'conn: loop {
            loop {
                match session.next(&mut rbuf) {
                    Next::NeedMore => break,
                    Next::Work(w) => {
                        if tx.send(w).is_err() {
                            break 'conn;
                        }
                    }
                    Next::Reply(r) => send(&r),
                    Next::Disconnect => break 'conn,
                }
            }
            match (&*conn).read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => rbuf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("read from client failed: {e}");
                    break;
                }
            }
        }
        drop(tx);
    });
    Ok(())
}

fn execute(session: &Session, w: Work) -> Vec<u8> {
    let image = &session.export.image;
    match w {
        Work::Read {
            cookie,
            offset,
            len,
            started,
        } => {
            let h = session.read_header_len();
            let mut buf = vec![0u8; h + len as usize];
            let r = image.file.read_exact_at(&mut buf[h..], offset);
            session.read_done(cookie, offset, buf, r, started)
        }
        Work::Write {
            cookie,
            offset,
            data,
            fua,
            ticket,
            started,
        } => {
            let r = image.file.write_all_at(&data, offset).and_then(|()| {
                if fua {
                    image.sync()
                } else {
                    Ok(())
                }
            });
            session.write_done(cookie, offset, data.len() as u32, ticket, r, started)
        }
        Work::Flush { cookie, started } => session.flush_done(cookie, image.sync(), started),
    }
}
