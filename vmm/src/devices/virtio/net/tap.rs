//! Host TAP interfaces, opened through /dev/net/tun with a 12-byte virtio-net header in front of
//! every frame (IFF_VNET_HDR), so checksum and segmentation offloads pass between the guest and
//! the host stack as they are, and with nonblocking I/O for the device's epoll loop.
//!
//! The device reaches the TAP through [`FrameIo`], which unit tests implement with a socket
//! pair.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::VolatileSlice;

/// Size of the virtio-net header on every frame (`virtio_net_hdr_v1`: virtio 1.x always has
/// `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Most buffers one frame is moved through in a single readv/writev (the kernel's UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;

/// Moves whole frames, each led by a virtio-net header, between the device and the host.
pub trait FrameIo: AsRawFd + Send + Sync {
    /// Reads one frame into `bufs` and returns the bytes read: a frame longer than the buffers
    /// is cut to their length (the rest is lost), and `WouldBlock` says no frame is waiting.
    fn read_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// Writes the frame gathered from `bufs`.
    fn write_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// Says which offloads the guest takes (`TUN_F_*`): with TUN_F_CSUM the host may hand over
    /// frames with partial checksums, with TUN_F_TSO4/6 unsegmented TCP frames up to 64 KiB.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface is not there.
    #[error("no such network interface (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    NoSuchInterface(String),
    /// The name is not one the kernel accepts.
    #[error("{0:?} is not a valid interface name")]
    BadName(String),
    /// The kernel has no TUN/TAP driver.
    #[error("opening /dev/net/tun: {0} (is the tun module loaded?)")]
    NoTun(io::Error),
    /// Not allowed to use /dev/net/tun or the interface.
    #[error("{0}: permission denied (attaching a TAP needs CAP_NET_ADMIN, or a TAP created for this user)")]
    Permission(&'static str),
    /// The interface exists but is not a TAP, or was created with options we cannot use (e.g.
    /// multi_queue).
    #[error("{0} is not a single-queue TAP interface")]
    NotTap(String),
    /// Another process has the TAP open.
    #[error("{0} is already in use by another process")]
    Busy(String),
    /// Any other failure setting the TAP up.
    #[error("{what}: {source}")]
    Host {
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl TapError {
    /// True when the user named a TAP that cannot work, rather than the host failing.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            TapError::NoSuchInterface(_)
                | TapError::BadName(_)
                | TapError::Permission(_)
                | TapError::NotTap(_)
                | TapError::Busy(_)
        )
    }
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_with<T>(fd: RawFd, request: libc::Ioctl, arg: &T) -> io::Result<()> {
    // SAFETY: `arg` points to a live value of the type the TUN ioctl `request` reads, and the
    // kernel only reads it (all requests we pass are _IOW).
    let r = unsafe { libc::ioctl(fd, request, arg as *const T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Attaches to the existing TAP interface `name` (in this process's network namespace).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bytes = name.as_bytes();
        let cname = CString::new(name).map_err(|_| TapError::BadName(name.into()))?;
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
            return Err(TapError::BadName(name.into()));
        }
        // TUNSETIFF would create a missing interface, one no bridge or route knows about.
        // SAFETY: `cname` is a NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoSuchInterface(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => TapError::Permission("/dev/net/tun"),
                _ => TapError::NoTun(e),
            })?;
        // SAFETY: ifreq is plain data (a name and a union of integers) for which zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ioctl_with(file.as_raw_fd(), libc::TUNSETIFF, &ifr).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::Permission("attaching"),
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Host {
                    what: "attaching to the TAP (TUNSETIFF)",
                    source: e,
                },
            }
        })?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_with(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len).map_err(|source| {
            TapError::Host {
                what: "setting the virtio-net header size (TUNSETVNETHDRSZ)",
                source,
            }
        })?;
        let tap = Tap {
            file,
            name: name.into(),
        };
        // Until a driver says what it takes, frames arrive whole and checksummed.
        tap.set_offload(0).map_err(|source| TapError::Host {
            what: "setting offloads (TUNSETOFFLOAD)",
            source,
        })?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// iovecs for `bufs`, which borrow guest memory that stays mapped while they live.
pub(crate) fn iovecs(bufs: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|b| libc::iovec {
            iov_base: b.ptr_guard_mut().as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

fn iov_count(n: usize) -> io::Result<libc::c_int> {
    if n > MAX_IOVECS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(n as libc::c_int)
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameIo for Tap {
    fn read_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let iov = iovecs(bufs);
        let count = iov_count(iov.len())?;
        // SAFETY: every iovec describes guest memory borrowed by `bufs` for this call; a TAP
        // read writes at most the iovecs' total length into them.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let iov = iovecs(bufs);
        let count = iov_count(iov.len())?;
        // SAFETY: every iovec describes guest memory borrowed by `bufs` for this call, which the
        // kernel only reads.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // TUNSETOFFLOAD takes its argument by value, not through a pointer.
        // SAFETY: the ioctl reads no memory of ours.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! A real TAP in a network namespace of its own, made on a dedicated thread (so neither the
    //! test process nor the machine's interfaces are touched; the namespace goes away with the
    //! thread). The host side of the TAP is a packet socket on it. Needs root (CAP_NET_ADMIN
    //! and CAP_NET_RAW) and /dev/net/tun; elsewhere the test says so and passes.
    use std::process::Command;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;

    struct PacketSocket(File);

    impl PacketSocket {
        fn bind(ifname: &str) -> PacketSocket {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2) call; the fd is owned by the File below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let c = CString::new(ifname).unwrap();
            // SAFETY: NUL-terminated string that outlives the call.
            let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
            // SAFETY: sockaddr_ll is plain data for which zero is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: `sll` is a valid sockaddr_ll of the length given.
            let r = unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            // SAFETY: SO_RCVTIMEO reads a timeval of the length given.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(r, 0);
            PacketSocket(file)
        }

        fn send(&self, frame: &[u8]) {
            use std::io::Write;
            (&self.0).write_all(frame).unwrap();
        }

        /// The next test frame (the kernel may send IPv6 router solicitations too).
        fn recv(&self) -> Vec<u8> {
            use std::io::Read;
            loop {
                let mut buf = vec![0u8; 70000];
                let n = (&self.0)
                    .read(&mut buf)
                    .expect("frame on the packet socket");
                buf.truncate(n);
                if buf.len() >= 14 && buf[12..14] == [0x88, 0xb5] {
                    return buf;
                }
            }
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1];
        f.extend_from_slice(&[0x88, 0xb5]); // local experimental EtherType
        f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        f
    }

    fn ip(netns_args: &[&str]) {
        let out = Command::new("ip").args(netns_args).output().expect("ip");
        assert!(out.status.success(), "ip {netns_args:?}: {out:?}");
    }

    fn in_new_netns(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's network namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "the real-TAP test needs a network namespace of its own (root): {}",
                io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_real_tap_carries_frames_with_a_vnet_header() {
        // The tests run as root (CI included): a TAP test that skipped itself would hide a
        // broken device.
        assert!(
            std::path::Path::new("/dev/net/tun").exists(),
            "the real-TAP test needs /dev/net/tun"
        );
        in_new_netns(|| {
            let e = Tap::open("lbtap0").unwrap_err();
            assert!(matches!(e, TapError::NoSuchInterface(_)), "{e}");
            assert!(e.is_bad_input());
            let e = Tap::open("lo").unwrap_err();
            assert!(matches!(e, TapError::NotTap(_)), "{e}");
            assert!(e.is_bad_input());

            // Children forked from this thread share its namespace.
            ip(&["tuntap", "add", "dev", "lbtap0", "mode", "tap"]);
            let tap = Tap::open("lbtap0").unwrap();
            assert_eq!(tap.name(), "lbtap0");
            let e = Tap::open("lbtap0").unwrap_err();
            assert!(matches!(e, TapError::Busy(_)), "{e}");
            ip(&["link", "set", "lbtap0", "up"]);
            let peer = PacketSocket::bind("lbtap0");
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            assert!(
                tap.set_offload(0x8000_0000).is_err(),
                "unknown offload bits"
            );
            tap.set_offload(0).unwrap();

            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            // Device → host: a zero header (no offload) and the frame, split across buffers.
            let out = frame(300, 1);
            mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x1000))
                .unwrap();
            mem.write_slice(&out[..100], GuestAddress(0x2000)).unwrap();
            mem.write_slice(&out[100..], GuestAddress(0x3000)).unwrap();
            let bufs = [
                mem.get_slice(GuestAddress(0x1000), VNET_HDR_LEN).unwrap(),
                mem.get_slice(GuestAddress(0x2000), 100).unwrap(),
                mem.get_slice(GuestAddress(0x3000), 200).unwrap(),
            ];
            assert_eq!(tap.write_frame(&bufs).unwrap(), VNET_HDR_LEN + 300);
            assert_eq!(peer.recv(), out);

            // Host → device: the frame led by a header the TAP wrote.
            let mut got = None;
            let inbound = frame(400, 2);
            peer.send(&inbound);
            let bufs = [
                mem.get_slice(GuestAddress(0x10000), 5).unwrap(),
                mem.get_slice(GuestAddress(0x20000), 2000).unwrap(),
            ];
            mem.write_slice(&[0xee; 5], GuestAddress(0x10000)).unwrap();
            for _ in 0..500 {
                match tap.read_frame(&bufs) {
                    Ok(n) => {
                        let mut b = vec![0u8; n.min(2005)];
                        mem.read_slice(&mut b[..5], GuestAddress(0x10000)).unwrap();
                        mem.read_slice(&mut b[5..], GuestAddress(0x20000)).unwrap();
                        if b[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5] {
                            got = Some(b);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => panic!("read_frame: {e}"),
                }
            }
            let got = got.expect("frame read from the TAP");
            assert_eq!(got.len(), VNET_HDR_LEN + 400);
            assert_eq!(&got[..10], &[0u8; 10], "no offload: an empty header");
            assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);

            // A frame longer than the buffers is cut to their length: the receive path tells a
            // cut frame from one that fits by offering one byte more than the guest's room.
            let big = frame(1400, 3);
            peer.send(&big);
            let small = [mem.get_slice(GuestAddress(0x30000), 600).unwrap()];
            let mut len = None;
            for _ in 0..500 {
                mem.write_slice(&[0u8; 14], GuestAddress(0x30000 + VNET_HDR_LEN as u64))
                    .unwrap();
                match tap.read_frame(&small) {
                    Ok(n) => {
                        let mut ethertype = [0u8; 2];
                        mem.read_slice(
                            &mut ethertype,
                            GuestAddress(0x30000 + VNET_HDR_LEN as u64 + 12),
                        )
                        .unwrap();
                        if ethertype == [0x88, 0xb5] {
                            len = Some(n);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => panic!("read_frame: {e}"),
                }
            }
            assert_eq!(len, Some(600));
            let mut head = vec![0u8; 600 - VNET_HDR_LEN];
            mem.read_slice(&mut head, GuestAddress(0x30000 + VNET_HDR_LEN as u64))
                .unwrap();
            assert_eq!(head, big[..600 - VNET_HDR_LEN]);
            // The rest of it is gone: the next read finds nothing of that frame.
            let rest = [mem.get_slice(GuestAddress(0x40000), 2000).unwrap()];
            match tap.read_frame(&rest) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(n) => {
                    let mut t = [0u8; 2];
                    mem.read_slice(&mut t, GuestAddress(0x40000 + VNET_HDR_LEN as u64 + 12))
                        .unwrap();
                    assert_ne!(t, [0x88, 0xb5], "a second piece of a cut frame ({n} bytes)");
                }
                Err(e) => panic!("read_frame: {e}"),
            }
        });
    }
}
