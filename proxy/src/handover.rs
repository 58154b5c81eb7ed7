//! Passing listening sockets to a new binary over a Unix stream (SCM_RIGHTS).
//!
//! Pingora has a transfer utility (`Fds::send_to_sock`), but it panics when its socket cannot be
//! bound, takes at most 32 descriptors and needs a second socket path; a handover here happens on
//! the control connection the new binary already holds, so it is done directly: one message
//! whose data is the JSON list of addresses, with one descriptor per address attached.

use std::io::{self, Read};
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// The kernel's limit of descriptors in one message is 253.
pub const MAX_FDS: usize = 250;

/// Sends `fds` (borrowed: they stay open here) with their `keys`.
pub fn send(stream: &UnixStream, keys: &[String], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || keys.len() != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} sockets: at most {MAX_FDS} in one handover", fds.len()),
        ));
    }
    let body = serde_json::to_vec(keys)?;
    let mut data = (body.len() as u32).to_le_bytes().to_vec();
    data.extend_from_slice(&body);
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space.max(size_of::<libc::cmsghdr>())];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: `control` is CMSG_SPACE(fd_bytes) long, so the first header and its data fit;
        // CMSG_FIRSTHDR of a msghdr with a control buffer that large is non-null.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: `msg` points at `iov` and `control`, both alive for the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < data.len() {
        // The descriptors went with the first byte; the rest is plain data.
        use std::io::Write;
        (&*stream).write_all(&data[n..])?;
    }
    Ok(())
}

/// Receives what [`send`] sent: the keys and the descriptors (owned by the caller now).
pub fn receive(stream: &UnixStream) -> io::Result<Vec<(String, RawFd)>> {
    let mut first = vec![0u8; 64 << 10];
    let fd_bytes = MAX_FDS * size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: first.as_mut_ptr() as *mut libc::c_void,
        iov_len: first.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: `msg` describes live buffers of the stated lengths.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR walk
    // within it and CMSG_DATA of an SCM_RIGHTS header holds (cmsg_len - CMSG_LEN(0)) bytes of
    // descriptors.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    fds.push(std::ptr::read_unaligned(data.add(i)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    let close_all = |fds: &[RawFd]| {
        for fd in fds {
            // SAFETY: these descriptors were just received and are owned by nobody else.
            unsafe { libc::close(*fd) };
        }
    };
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if truncated {
        close_all(&fds);
        return Err(bad("the sockets did not fit in one message".into()));
    }
    let mut data = first[..n as usize].to_vec();
    while data.len() < 4 {
        let mut b = [0u8; 4];
        let k = (&*stream).read(&mut b[..4 - data.len()])?;
        if k == 0 {
            close_all(&fds);
            return Err(bad("the connection closed during the handover".into()));
        }
        data.extend_from_slice(&b[..k]);
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if len > 1 << 20 {
        close_all(&fds);
        return Err(bad(format!("a handover of {len} bytes")));
    }
    while data.len() < 4 + len {
        let mut rest = vec![0u8; 4 + len - data.len()];
        let k = (&*stream).read(&mut rest)?;
        if k == 0 {
            close_all(&fds);
            return Err(bad("the connection closed during the handover".into()));
        }
        data.extend_from_slice(&rest[..k]);
    }
    let keys: Vec<String> = match serde_json::from_slice(&data[4..4 + len]) {
        Ok(k) => k,
        Err(e) => {
            close_all(&fds);
            return Err(bad(format!("handover keys: {e}")));
        }
    };
    if keys.len() != fds.len() {
        close_all(&fds);
        return Err(bad(format!(
            "{} keys for {} sockets",
            keys.len(),
            fds.len()
        )));
    }
    Ok(keys.into_iter().zip(fds).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::{FromRawFd, OwnedFd};

    #[test]
    fn sockets_arrive_listening() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let keys = vec![
            l1.local_addr().unwrap().to_string(),
            l2.local_addr().unwrap().to_string(),
        ];
        send(&a, &keys, &[l1.as_raw_fd(), l2.as_raw_fd()]).unwrap();
        let got = receive(&b).unwrap();
        assert_eq!(got.len(), 2);
        for (key, fd) in got {
            // SAFETY: received just now, owned by nobody else.
            let l = TcpListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
            assert_eq!(l.local_addr().unwrap().to_string(), key);
            let _c = std::net::TcpStream::connect(&key).unwrap();
            l.accept().unwrap();
        }
        // None at all is fine too.
        send(&a, &[], &[]).unwrap();
        assert!(receive(&b).unwrap().is_empty());
    }
}
