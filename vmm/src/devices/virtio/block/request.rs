//! virtio-blk requests: parsing a descriptor chain into a request, and carrying it out against a
//! [`DiskBackend`]. Every malformed chain is answered with an error status when the chain has
//! somewhere to put one; nothing here panics on guest input.

use std::sync::atomic::{AtomicU64, Ordering};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Le32, Le64,
};

use block::{DiskBackend, Io, Segments};

/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
const HEADER_SIZE: u32 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// One descriptor of a chain, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// What the device knows about its disk while serving requests.
#[derive(Clone, Debug, Default)]
pub struct DiskInfo {
    /// Disk size in bytes.
    pub size: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// The serial number GET_ID returns (up to 20 bytes).
    pub serial: Vec<u8>,
    /// Request counters, shared with whoever reports them.
    pub counters: std::sync::Arc<Counters>,
}

/// Requests served, by kind (accepted requests; `errors` counts answers other than OK).
#[derive(Debug, Default)]
pub struct Counters {
    /// Read requests.
    pub read_ops: AtomicU64,
    /// Bytes asked for by reads.
    pub read_bytes: AtomicU64,
    /// Write requests.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes.
    pub flush_ops: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a completion's status.
    pub fn completed(&self, c: &Completion) {
        if u32::from(c.status) != VIRTIO_BLK_S_OK {
            Self::add(&self.errors, 1);
        }
    }
}

/// A request that could not even be parsed far enough to answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Unanswerable {
    /// No writable status byte at the end of the chain (or it lies outside guest memory).
    NoStatus,
}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Header {
    kind: Le32,
    _reserved: Le32,
    sector: Le64,
}
// SAFETY: plain little-endian integers, every bit pattern is valid.
unsafe impl ByteValued for Header {}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}
// SAFETY: plain little-endian integers, every bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

/// A parsed request.
#[derive(Debug)]
struct Request {
    kind: u32,
    sector: u64,
    /// Data buffers: device-readable for OUT/DISCARD/WRITE_ZEROES, device-writable otherwise.
    data: Segments,
    status: GuestAddress,
}

fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    len == 0 || mem.check_range(addr, len as usize)
}

/// Gathers `n` bytes from the start of `descs`, returning them and the descriptors' remainder.
fn gather(mem: &GuestMemoryMmap, descs: &[Desc], n: u32) -> Option<(Vec<u8>, Segments)> {
    let mut bytes = Vec::with_capacity(n as usize);
    let mut rest = Vec::new();
    for d in descs {
        let want = (n as usize - bytes.len()).min(d.len as usize) as u32;
        if want > 0 {
            let mut buf = vec![0u8; want as usize];
            mem.read_slice(&mut buf, d.addr).ok()?;
            bytes.extend_from_slice(&buf);
        }
        if d.len > want {
            rest.push((d.addr.checked_add(u64::from(want))?, d.len - want));
        }
    }
    (bytes.len() == n as usize).then_some((bytes, rest))
}

/// Splits a chain into a request. `Err(Some(status))` means "answer with this status at
/// `status`"; `Err(None)` means the chain cannot be answered at all.
fn parse(mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<Request, (Option<GuestAddress>, u8)> {
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    let last = descs.last().ok_or((None, ioerr))?;
    if !last.writable || last.len == 0 {
        return Err((None, ioerr));
    }
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .filter(|a| in_memory(mem, *a, 1))
        .ok_or((None, ioerr))?;
    let fail = |s: u32| (Some(status), s as u8);
    // Readable descriptors come first, then writable ones.
    let split = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[split..].iter().any(|d| !d.writable) {
        return Err(fail(VIRTIO_BLK_S_IOERR));
    }
    let (readable, writable) = descs.split_at(split);
    for d in descs {
        if !in_memory(mem, d.addr, d.len) {
            return Err(fail(VIRTIO_BLK_S_IOERR));
        }
    }
    let (header, readable_rest) =
        gather(mem, readable, HEADER_SIZE).ok_or(fail(VIRTIO_BLK_S_IOERR))?;
    let header = Header::from_slice(&header)
        .copied()
        .ok_or(fail(VIRTIO_BLK_S_IOERR))?;
    let kind = header.kind.to_native();
    // Device-writable data is everything writable but the status byte.
    let mut writable_data: Segments = writable.iter().map(|d| (d.addr, d.len)).collect();
    if let Some(last) = writable_data.last_mut() {
        last.1 -= 1;
    }
    writable_data.retain(|d| d.1 > 0);
    let data = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => {
            if !readable_rest.is_empty() {
                return Err(fail(VIRTIO_BLK_S_IOERR));
            }
            writable_data
        }
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !writable_data.is_empty() {
                return Err(fail(VIRTIO_BLK_S_IOERR));
            }
            readable_rest
        }
        _ => Vec::new(),
    };
    Ok(Request {
        kind,
        sector: header.sector.to_native(),
        data,
        status,
    })
}

fn data_len(data: &[(GuestAddress, u32)]) -> u64 {
    data.iter().map(|d| u64::from(d.1)).sum()
}

/// Byte offset of `sector` when `len` bytes from there fit on the disk.
fn checked_range(info: &DiskInfo, sector: u64, len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    (offset.checked_add(len)? <= info.size).then_some(offset)
}

/// A data transfer (IN or OUT) that passed every check and only needs doing, and where its
/// status byte goes.
#[derive(Debug)]
pub struct Transfer {
    /// The transfer.
    pub io: Io,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A finished request: the status to report and the bytes written into guest buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// VIRTIO_BLK_S_*.
    pub status: u8,
    /// Bytes the device wrote into guest data buffers.
    pub written: u32,
}

/// What to do with a chain.
#[derive(Debug)]
pub enum Plan {
    /// Done already (errors, GET_ID).
    Complete(Completion),
    /// A read or write to carry out, synchronously or through an asynchronous engine.
    Transfer(Transfer),
    /// A flush, discard or write-zeroes to carry out synchronously (see
    /// [`DiskOp::completion`]).
    Disk {
        /// What to do.
        op: DiskOp,
        /// Where the status byte goes.
        status: GuestAddress,
    },
}

/// A request on the disk as a whole or a range of it, without guest buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOp {
    /// Make what was written durable.
    Flush,
    /// Drop `len` bytes at `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Zero `len` bytes at `offset`, freeing space when `unmap`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Space may be freed.
        unmap: bool,
    },
}

impl DiskOp {
    /// Carries it out.
    pub fn run(&self, disk: &mut dyn DiskBackend) -> std::io::Result<()> {
        match *self {
            DiskOp::Flush => disk.flush(),
            DiskOp::Discard { offset, len } => disk.discard(offset, len),
            DiskOp::WriteZeroes { offset, len, unmap } => disk.write_zeroes(offset, len, unmap),
        }
    }

    /// Its completion, given its outcome.
    pub fn completion(&self, status: GuestAddress, result: std::io::Result<()>) -> Completion {
        let code = match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::warn!("virtio-blk: {self:?}: {e}");
                VIRTIO_BLK_S_IOERR
            }
        };
        Completion {
            status_addr: status,
            status: code as u8,
            written: 0,
        }
    }
}

impl Transfer {
    /// Carries the transfer out with the backend's synchronous calls.
    pub fn run_sync(&self, mem: &GuestMemoryMmap, disk: &mut dyn DiskBackend) -> Completion {
        completion(&self.io, self.status, self.io.run_sync(mem, disk))
    }
}

/// The completion of transfer `io`, whose status byte goes to `status`, given its outcome.
pub fn completion(io: &Io, status: GuestAddress, result: std::io::Result<()>) -> Completion {
    let (code, written) = match result {
        Ok(()) if io.write => (VIRTIO_BLK_S_OK, 0),
        Ok(()) => (VIRTIO_BLK_S_OK, io.len),
        Err(e) => {
            tracing::warn!(
                "virtio-blk: {} of {} bytes at {:#x}: {e}",
                if io.write { "write" } else { "read" },
                io.len,
                io.offset
            );
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    Completion {
        status_addr: status,
        status: code as u8,
        written,
    }
}

/// Checks a parsed request and says what it takes: data transfers come back as a [`Transfer`],
/// requests on the disk as a [`DiskOp`], the rest is answered.
fn plan_request(mem: &GuestMemoryMmap, info: &DiskInfo, req: Request) -> Plan {
    let done = |status: u32, written: u32| {
        Plan::Complete(Completion {
            status_addr: req.status,
            status: status as u8,
            written,
        })
    };
    let len = data_len(&req.data);
    if req.kind == VIRTIO_BLK_T_FLUSH {
        Counters::add(&info.counters.flush_ops, 1);
    }
    match req.kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req.kind == VIRTIO_BLK_T_OUT;
            if write && info.read_only || len % SECTOR_SIZE != 0 || len > u64::from(u32::MAX) {
                return done(VIRTIO_BLK_S_IOERR, 0);
            }
            match checked_range(info, req.sector, len) {
                Some(offset) => {
                    let c = &info.counters;
                    if write {
                        Counters::add(&c.write_ops, 1);
                        Counters::add(&c.write_bytes, len);
                    } else {
                        Counters::add(&c.read_ops, 1);
                        Counters::add(&c.read_bytes, len);
                    }
                    Plan::Transfer(Transfer {
                        io: Io {
                            write,
                            offset,
                            segments: req.data,
                            len: len as u32,
                        },
                        status: req.status,
                    })
                }
                None => done(VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_FLUSH => Plan::Disk {
            op: DiskOp::Flush,
            status: req.status,
        },
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = info.serial.len().min(id.len());
            id[..n].copy_from_slice(&info.serial[..n]);
            let mut written = 0usize;
            for (addr, l) in &req.data {
                let take = (*l as usize).min(id.len() - written);
                if take == 0
                    || mem
                        .write_slice(&id[written..written + take], *addr)
                        .is_err()
                {
                    break;
                }
                written += take;
            }
            done(VIRTIO_BLK_S_OK, written as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if info.read_only {
                return done(VIRTIO_BLK_S_IOERR, 0);
            }
            // We advertise one segment per request.
            let Some(seg) = gather(mem, &descs_of(&req.data), 16)
                .and_then(|(b, _)| DiscardSegment::from_slice(&b).copied())
                .filter(|_| len == 16)
            else {
                return done(VIRTIO_BLK_S_UNSUPP, 0);
            };
            let bytes = u64::from(seg.num_sectors.to_native()) * SECTOR_SIZE;
            let Some(offset) = checked_range(info, seg.sector.to_native(), bytes) else {
                return done(VIRTIO_BLK_S_IOERR, 0);
            };
            let flags = seg.flags.to_native();
            let op = if req.kind == VIRTIO_BLK_T_DISCARD {
                if flags != 0 {
                    return done(VIRTIO_BLK_S_UNSUPP, 0);
                }
                DiskOp::Discard { offset, len: bytes }
            } else {
                if flags & !WRITE_ZEROES_UNMAP != 0 {
                    return done(VIRTIO_BLK_S_UNSUPP, 0);
                }
                DiskOp::WriteZeroes {
                    offset,
                    len: bytes,
                    unmap: flags & WRITE_ZEROES_UNMAP != 0,
                }
            };
            Plan::Disk {
                op,
                status: req.status,
            }
        }
        _ => done(VIRTIO_BLK_S_UNSUPP, 0),
    }
}

fn descs_of(data: &[(GuestAddress, u32)]) -> Vec<Desc> {
    data.iter()
        .map(|(addr, len)| Desc {
            addr: *addr,
            len: *len,
            writable: false,
        })
        .collect()
}

/// Parses a chain and does everything but its data transfer.
pub fn plan(mem: &GuestMemoryMmap, info: &DiskInfo, descs: &[Desc]) -> Result<Plan, Unanswerable> {
    match parse(mem, descs) {
        Ok(req) => Ok(plan_request(mem, info, req)),
        Err((Some(status_addr), status)) => Ok(Plan::Complete(Completion {
            status_addr,
            status,
            written: 0,
        })),
        Err((None, _)) => Err(Unanswerable::NoStatus),
    }
}

/// Writes the status byte; returns the length to report in the used ring (bytes the device wrote,
/// status included).
pub fn complete(mem: &GuestMemoryMmap, c: &Completion) -> Result<u32, Unanswerable> {
    mem.write_obj(c.status, c.status_addr)
        .map_err(|_| Unanswerable::NoStatus)?;
    Ok(c.written + 1)
}

/// Serves one chain synchronously: parses, executes, writes the status byte. Returns the length
/// to report in the used ring.
pub fn handle(
    mem: &GuestMemoryMmap,
    disk: &mut dyn DiskBackend,
    info: &DiskInfo,
    descs: &[Desc],
) -> Result<u32, Unanswerable> {
    let completion = match plan(mem, info, descs)? {
        Plan::Complete(c) => c,
        Plan::Transfer(t) => t.run_sync(mem, disk),
        Plan::Disk { op, status } => op.completion(status, op.run(disk)),
    };
    complete(mem, &completion)
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::MemoryDisk as MemDisk;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x3000;

    fn setup() -> (GuestMemoryMmap, MemDisk, DiskInfo) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 256) as u8).collect();
        let info = DiskInfo {
            size: data.len() as u64,
            read_only: false,
            serial: b"lb-serial".to_vec(),
            ..DiskInfo::default()
        };
        (
            mem,
            MemDisk {
                data,
                flushed: false,
            },
            info,
        )
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(
            Header {
                kind: kind.into(),
                _reserved: 0.into(),
                sector: sector.into(),
            },
            GuestAddress(HDR),
        )
        .unwrap();
    }

    fn d(addr: u64, len: u32, writable: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    fn status(mem: &GuestMemoryMmap) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    fn run(mem: &GuestMemoryMmap, disk: &mut MemDisk, info: &DiskInfo, descs: &[Desc]) -> u32 {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        handle(mem, disk, info, descs).unwrap()
    }

    #[test]
    fn read_write_flush_get_id() {
        let (mem, mut disk, info) = setup();
        header(&mem, VIRTIO_BLK_T_IN, 2);
        let used = run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 1024, true), d(STATUS, 1, true)],
        );
        assert_eq!((status(&mem), used), (VIRTIO_BLK_S_OK, 1025));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, disk.data[1024..2048]);

        mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 10);
        let used = run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 512, false), d(STATUS, 1, true)],
        );
        assert_eq!((status(&mem), used), (VIRTIO_BLK_S_OK, 1));
        assert!(disk.data[5120..5632].iter().all(|b| *b == 0xee));

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert!(disk.flushed);

        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let used = run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 20, true), d(STATUS, 1, true)],
        );
        assert_eq!((status(&mem), used), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"lb-serial");
        assert!(id[9..].iter().all(|b| *b == 0));
    }

    #[test]
    fn header_and_status_may_share_descriptors_with_data() {
        let (mem, mut disk, info) = setup();
        // Header split over two descriptors; data and status in one writable descriptor.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let used = run(
            &mem,
            &mut disk,
            &info,
            &[
                d(HDR, 8, false),
                d(HDR + 8, 8, false),
                d(STATUS - 512, 513, true),
            ],
        );
        assert_eq!((status(&mem), used), (VIRTIO_BLK_S_OK, 513));
    }

    #[test]
    fn bad_requests_get_error_statuses() {
        let (mem, mut disk, info) = setup();
        // Read past the end of the disk.
        header(&mem, VIRTIO_BLK_T_IN, 127);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 1024, true), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // Sector number that overflows when turned into bytes.
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX / 2);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 512, true), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // Unknown request type.
        header(&mem, 0x55, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
        // Header shorter than 16 bytes.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 8, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // Data buffer outside guest memory.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(1 << 30, 512, true), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // Data length that is not a whole number of sectors.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 100, true), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // A readable descriptor after a writable one.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[
                d(HDR, 16, false),
                d(DATA, 512, true),
                d(DATA, 512, false),
                d(STATUS, 1, true),
            ],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        // OUT with device-writable data.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 512, true), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn chains_without_a_status_byte_cannot_be_answered() {
        let (mem, mut disk, info) = setup();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            handle(&mem, &mut disk, &info, &[]),
            Err(Unanswerable::NoStatus)
        );
        assert_eq!(
            handle(&mem, &mut disk, &info, &[d(HDR, 16, false)]),
            Err(Unanswerable::NoStatus)
        );
        assert_eq!(
            handle(
                &mem,
                &mut disk,
                &info,
                &[d(HDR, 16, false), d(1 << 30, 1, true)]
            ),
            Err(Unanswerable::NoStatus)
        );
        assert_eq!(
            handle(
                &mem,
                &mut disk,
                &info,
                &[d(HDR, 16, false), d(STATUS, 0, true)]
            ),
            Err(Unanswerable::NoStatus)
        );
    }

    #[test]
    fn read_only_disks_refuse_writes_but_serve_reads() {
        let (mem, mut disk, mut info) = setup();
        info.read_only = true;
        let before = disk.data.clone();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 512, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 512, true), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(disk.data, before);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let (mem, mut disk, info) = setup();
        let seg = |sector: u64, n: u32, flags: u32| DiscardSegment {
            sector: sector.into(),
            num_sectors: n.into(),
            flags: flags.into(),
        };
        mem.write_obj(seg(4, 2, 0), GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 16, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert!(disk.data[2048..3072].iter().all(|b| *b == 0));
        assert_eq!(
            disk.data[3073],
            (3073u32 * 7 % 256) as u8,
            "outside the range: kept"
        );
        mem.write_obj(seg(8, 1, WRITE_ZEROES_UNMAP), GuestAddress(DATA))
            .unwrap();
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 16, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert!(disk.data[4096..4608].iter().all(|b| *b == 0));
        // Past the end, unknown flags, two segments.
        mem.write_obj(seg(1000, 1, 0), GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 16, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        mem.write_obj(seg(0, 1, 8), GuestAddress(DATA)).unwrap();
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 16, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
        run(
            &mem,
            &mut disk,
            &info,
            &[d(HDR, 16, false), d(DATA, 32, false), d(STATUS, 1, true)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
    }
}
