//! Read-only FAT12/16/32 driver, after Microsoft's "FAT: General Overview of On-Disk Format".
//!
//! Everything on disk is untrusted: every cluster number is range-checked before use, chain
//! walks are bounded by the volume's cluster count and directory scans by the 65536-entry
//! limit, so a corrupt volume yields `FatError` rather than a panic or a hang.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;
use core::fmt;

use crate::block::{read_bytes, BlockDevice, IoError};

pub const ATTR_READ_ONLY: u8 = 0x01;
pub const ATTR_HIDDEN: u8 = 0x02;
pub const ATTR_SYSTEM: u8 = 0x04;
pub const ATTR_VOLUME_ID: u8 = 0x08;
pub const ATTR_DIRECTORY: u8 = 0x10;
pub const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LONG_NAME: u8 = ATTR_READ_ONLY | ATTR_HIDDEN | ATTR_SYSTEM | ATTR_VOLUME_ID;
const ATTR_LONG_NAME_MASK: u8 = 0x3F;

const DIR_ENTRY_SIZE: u64 = 32;
// The spec caps a directory at 65536 entries; a directory chain running past that is
// corrupt, and stopping there bounds scans of cyclic directories.
const MAX_DIR_BYTES: u64 = 65536 * DIR_ENTRY_SIZE;
const ENTRY_FREE: u8 = 0xE5;
const ENTRY_END: u8 = 0x00;
// NT stores all-lowercase 8.3 names without an LFN and flags them in byte 12.
const NT_LOWER_BASE: u8 = 0x08;
const NT_LOWER_EXT: u8 = 0x10;

// FAT windows are large because a kernel's chain covers tens of KiB of FAT and each device
// read is a VM exit; directories are smaller and touched less.
const FAT_WINDOW: u64 = 16384;
const FAT_SLOTS: usize = 4;
const DIR_WINDOW: u64 = 4096;
const DIR_SLOTS: usize = 4;
const CURSORS: usize = 4;
// A multiple of 3 so FAT12 entry pairs never straddle a chunk, and of 4096 so chunks stay
// block-aligned.
const FREE_SCAN_CHUNK: usize = 3 * 16384;

const MAX_FAT12_CLUSTERS: u64 = 4085;
const MAX_FAT16_CLUSTERS: u64 = 65525;
// 0x0FFFFFF7 marks a bad cluster, so the highest usable cluster number is 0x0FFFFFF6.
const MAX_FAT32_CLUSTERS: u64 = 0x0FFF_FFF5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatError {
    Io,
    NotFat(&'static str),
    NotFound,
    NotADirectory,
    IsADirectory,
    Corrupt(&'static str),
}

impl fmt::Display for FatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FatError::Io => f.write_str("I/O error"),
            FatError::NotFat(why) => write!(f, "not a FAT filesystem: {why}"),
            FatError::NotFound => f.write_str("not found"),
            FatError::NotADirectory => f.write_str("not a directory"),
            FatError::IsADirectory => f.write_str("is a directory"),
            FatError::Corrupt(why) => write!(f, "corrupt FAT filesystem: {why}"),
        }
    }
}

impl From<IoError> for FatError {
    fn from(_: IoError) -> Self {
        FatError::Io
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

/// A timestamp as stored (local time, no zone). All zero when the field was never set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The long name if there is a valid one, else the 8.3 name.
    pub name: String,
    pub is_dir: bool,
    /// 0 for the FAT12/16 root directory and for empty files.
    pub first_cluster: u32,
    pub size: u64,
    pub attributes: u8,
    pub created: DateTime,
    pub modified: DateTime,
    pub accessed: DateTime,
}

struct Window {
    base: u64,
    data: Vec<u8>,
}

/// Most recently used window first.
#[derive(Default)]
struct Cache {
    slots: Vec<Window>,
}

/// A known position in a cluster chain: cluster number `cluster` is the `index`th of the
/// chain starting at `first`. Sequential reads resume from here instead of from `first`.
#[derive(Clone, Copy)]
struct Cursor {
    first: u32,
    index: u64,
    cluster: u32,
}

struct Entry {
    node: Node,
    /// The 8.3 name as stored (upper case), which lookups also match.
    short: String,
}

/// A mounted volume. Not `Sync`: caches live in `Cell`s so lookups can take `&self`.
pub struct Fat<D: BlockDevice> {
    dev: D,
    fat_type: FatType,
    cluster_size: u32,
    /// Byte offset of the FAT we read: the active one when FAT32 mirroring is off.
    fat_offset: u64,
    /// Bytes of FAT that hold entries 0..=max cluster.
    fat_used_bytes: u64,
    root_offset: u64,
    root_entries: u32,
    data_offset: u64,
    cluster_count: u32,
    root_cluster: u32,
    volume_bytes: u64,
    bpb_label: Option<[u8; 11]>,
    // Cells rather than RefCells: values are taken out and put back, so no borrow can fail.
    fat_cache: Cell<Cache>,
    dir_cache: Cell<Cache>,
    cursors: Cell<[Option<Cursor>; CURSORS]>,
    free_clusters: Cell<Option<u32>>,
    label: Cell<Option<String>>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<D: BlockDevice> Fat<D> {
    /// Parses the boot sector. The FAT type follows the cluster count, except that a BPB with
    /// FATSz16 = 0 is always FAT32: its FAT16 fields are absent, and Windows, Linux and EDK2
    /// all mount such small FAT32 volumes.
    pub fn new(dev: D) -> Result<Self, FatError> {
        let mut bs = [0u8; 512];
        read_bytes(&dev, 0, &mut bs)?;
        if bs[0] != 0xEB && bs[0] != 0xE9 {
            return Err(FatError::NotFat("no jump instruction in the boot sector"));
        }
        let bytes_per_sector = u64::from(le16(&bs, 11));
        if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
            return Err(FatError::NotFat("bad bytes per sector"));
        }
        let sectors_per_cluster = u64::from(bs[13]);
        if !sectors_per_cluster.is_power_of_two() {
            return Err(FatError::NotFat("bad sectors per cluster"));
        }
        let reserved = u64::from(le16(&bs, 14));
        if reserved == 0 {
            return Err(FatError::NotFat("no reserved sectors"));
        }
        let num_fats = u64::from(bs[16]);
        if num_fats == 0 {
            return Err(FatError::NotFat("no FATs"));
        }
        let root_entries = le16(&bs, 17);
        let media = bs[21];
        if media != 0xF0 && media < 0xF8 {
            return Err(FatError::NotFat("bad media descriptor"));
        }
        let fat32_layout = le16(&bs, 22) == 0;
        let fat_sectors = if fat32_layout {
            u64::from(le32(&bs, 36))
        } else {
            u64::from(le16(&bs, 22))
        };
        if fat_sectors == 0 {
            return Err(FatError::NotFat("zero FAT size"));
        }
        let total_sectors = match le16(&bs, 19) {
            0 => u64::from(le32(&bs, 32)),
            n => u64::from(n),
        };

        let root_sectors = (u64::from(root_entries) * DIR_ENTRY_SIZE).div_ceil(bytes_per_sector);
        let fats_end = reserved + num_fats * fat_sectors;
        let data_start = fats_end + root_sectors;
        let data_sectors = total_sectors
            .checked_sub(data_start)
            .ok_or(FatError::NotFat("metadata larger than the volume"))?;
        let cluster_count = data_sectors / sectors_per_cluster;
        if cluster_count == 0 {
            return Err(FatError::NotFat("no data clusters"));
        }
        let fat_type = if fat32_layout {
            if root_entries != 0 {
                return Err(FatError::NotFat("FAT32 with a fixed root directory"));
            }
            if cluster_count > MAX_FAT32_CLUSTERS {
                return Err(FatError::NotFat("too many clusters"));
            }
            FatType::Fat32
        } else if cluster_count < MAX_FAT12_CLUSTERS {
            FatType::Fat12
        } else if cluster_count < MAX_FAT16_CLUSTERS {
            FatType::Fat16
        } else {
            return Err(FatError::NotFat("FAT16 layout with a FAT32 cluster count"));
        };

        let entries = cluster_count + 2;
        let fat_used_bytes = match fat_type {
            FatType::Fat12 => (entries * 3).div_ceil(2),
            FatType::Fat16 => entries * 2,
            FatType::Fat32 => entries * 4,
        };
        if fat_used_bytes > fat_sectors * bytes_per_sector {
            return Err(FatError::NotFat("FAT too small for the cluster count"));
        }
        let volume_bytes = total_sectors * bytes_per_sector;
        let device_bytes = dev.num_blocks().saturating_mul(u64::from(dev.block_size()));
        if volume_bytes > device_bytes {
            return Err(FatError::NotFat("volume larger than the device"));
        }

        let mut active_fat = 0;
        let mut root_cluster = 0;
        let label_at;
        if fat_type == FatType::Fat32 {
            let ext_flags = le16(&bs, 40);
            // Bit 7 means only one FAT is maintained; the others may be stale.
            if ext_flags & 0x80 != 0 {
                active_fat = u64::from(ext_flags & 0x0F);
                if active_fat >= num_fats {
                    return Err(FatError::NotFat("active FAT does not exist"));
                }
            }
            root_cluster = le32(&bs, 44);
            if root_cluster < 2 || u64::from(root_cluster) > cluster_count + 1 {
                return Err(FatError::NotFat("root cluster out of range"));
            }
            label_at = 66;
        } else {
            label_at = 38;
        }
        // Only the extended boot signature 0x29 guarantees the label field is present.
        let bpb_label = (bs[label_at] == 0x29).then(|| {
            let mut l = [0u8; 11];
            l.copy_from_slice(&bs[label_at + 5..label_at + 16]);
            l
        });

        Ok(Fat {
            dev,
            fat_type,
            cluster_size: (bytes_per_sector * sectors_per_cluster) as u32,
            fat_offset: (reserved + active_fat * fat_sectors) * bytes_per_sector,
            fat_used_bytes,
            root_offset: fats_end * bytes_per_sector,
            root_entries: u32::from(root_entries),
            data_offset: data_start * bytes_per_sector,
            cluster_count: cluster_count as u32,
            root_cluster,
            volume_bytes,
            bpb_label,
            fat_cache: Cell::new(Cache::default()),
            dir_cache: Cell::new(Cache::default()),
            cursors: Cell::new([None; CURSORS]),
            free_clusters: Cell::new(None),
            label: Cell::new(None),
        })
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    pub fn fat_type(&self) -> FatType {
        self.fat_type
    }

    pub fn cluster_size(&self) -> u32 {
        self.cluster_size
    }

    /// Size of the data area.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.cluster_count) * u64::from(self.cluster_size)
    }

    pub fn root(&self) -> Node {
        Node {
            name: String::new(),
            is_dir: true,
            first_cluster: match self.fat_type {
                FatType::Fat32 => self.root_cluster,
                _ => 0,
            },
            size: 0,
            attributes: ATTR_DIRECTORY,
            created: DateTime::default(),
            modified: DateTime::default(),
            accessed: DateTime::default(),
        }
    }

    /// The label from the root directory's volume-label entry, else from the boot sector,
    /// without trailing spaces. Empty when unset ("NO NAME" is the formatters' placeholder).
    pub fn volume_label(&self) -> String {
        let cached = self.label.take();
        let label = cached.unwrap_or_else(|| self.find_label());
        self.label.set(Some(label.clone()));
        label
    }

    /// Counts free clusters once; the result is cached since the volume is read-only.
    pub fn free_bytes(&self) -> Result<u64, FatError> {
        let free = match self.free_clusters.get() {
            Some(n) => n,
            None => {
                let n = self.count_free()?;
                self.free_clusters.set(Some(n));
                n
            }
        };
        Ok(u64::from(free) * u64::from(self.cluster_size))
    }

    /// Resolves `path` relative to `from` ('/' or '\\' separators; a leading one starts at the
    /// root). "." and ".." are handled, empty components ignored, and names match
    /// case-insensitively against long or 8.3 names.
    pub fn lookup(&self, from: &Node, path: &str) -> Result<Node, FatError> {
        let mut cur = if path.starts_with(['/', '\\']) {
            self.root()
        } else {
            from.clone()
        };
        // The nodes we descended through, so ".." can return them without a disk search.
        let mut ancestors: Vec<Node> = Vec::new();
        for comp in path.split(['/', '\\']) {
            if comp.is_empty() {
                continue;
            }
            if !cur.is_dir {
                return Err(FatError::NotADirectory);
            }
            match comp {
                "." => {}
                ".." => {
                    cur = match ancestors.pop() {
                        Some(parent) => parent,
                        None => self.parent_of(&cur)?,
                    }
                }
                name => {
                    let child = self.find_in(&cur, name)?;
                    ancestors.push(core::mem::replace(&mut cur, child));
                }
            }
        }
        Ok(cur)
    }

    /// Reads from `offset`; returns the bytes read (0 at or after the end).
    pub fn read(&self, file: &Node, offset: u64, buf: &mut [u8]) -> Result<usize, FatError> {
        if file.is_dir {
            return Err(FatError::IsADirectory);
        }
        if offset >= file.size || buf.is_empty() {
            return Ok(0);
        }
        let len = (file.size - offset).min(buf.len() as u64) as usize;
        let cs = u64::from(self.cluster_size);
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let within = pos % cs;
            let mut index = pos / cs;
            let start = self
                .cluster_at(file.first_cluster, index)?
                .ok_or(FatError::Corrupt("cluster chain shorter than the file"))?;

            // Extend over physically contiguous clusters so the run is one device request.
            let want = (len - done) as u64;
            let mut last = start;
            let mut span = cs - within;
            let mut resume = Cursor {
                first: file.first_cluster,
                index,
                cluster: last,
            };
            while span < want {
                let Some(next) = self.next_cluster(last)? else {
                    break;
                };
                resume = Cursor {
                    first: file.first_cluster,
                    index: index + 1,
                    cluster: next,
                };
                if next != last + 1 {
                    break;
                }
                last = next;
                index += 1;
                span += cs;
            }
            self.cursor_put(resume);

            let n = span.min(want) as usize;
            read_bytes(
                &self.dev,
                self.cluster_offset(start) + within,
                &mut buf[done..done + n],
            )?;
            done += n;
        }
        Ok(len)
    }

    /// Next entry of `dir` after cursor `*pos` (start with 0), advancing `pos`. Skips ".",
    /// "..", deleted entries and volume labels. An entry that cannot be used (a subdirectory
    /// without a cluster) is an error, but `pos` has moved past it so listing can continue.
    pub fn next_entry(&self, dir: &Node, pos: &mut u64) -> Result<Option<Node>, FatError> {
        match self.scan(dir, pos)? {
            Some(e) if is_broken_dir(&e.node) => {
                Err(FatError::Corrupt("directory without a cluster"))
            }
            other => Ok(other.map(|e| e.node)),
        }
    }

    fn is_root(&self, dir: &Node) -> bool {
        dir.is_dir
            && (dir.first_cluster == 0
                || (self.fat_type == FatType::Fat32 && dir.first_cluster == self.root_cluster))
    }

    fn dir_node(&self, cluster: u32) -> Node {
        let mut node = self.root();
        node.first_cluster = cluster;
        node
    }

    fn find_in(&self, dir: &Node, name: &str) -> Result<Node, FatError> {
        let mut pos = 0;
        while let Some(e) = self.scan(dir, &mut pos)? {
            if eq_ignore_case(&e.node.name, name) || eq_ignore_case(&e.short, name) {
                if is_broken_dir(&e.node) {
                    return Err(FatError::Corrupt("directory without a cluster"));
                }
                return Ok(e.node);
            }
        }
        Err(FatError::NotFound)
    }

    fn parent_of(&self, dir: &Node) -> Result<Node, FatError> {
        if self.is_root(dir) {
            return Ok(self.root());
        }
        let parent = self.dotdot_cluster(dir)?;
        if parent == 0 || (self.fat_type == FatType::Fat32 && parent == self.root_cluster) {
            return Ok(self.root());
        }
        // ".." only gives the cluster; the parent's name and times are in its own entry in
        // the grandparent. Finding them is best effort: the cluster alone is a usable node.
        Ok(self.named_dir(parent).unwrap_or_else(|| {
            let mut node = self.dir_node(parent);
            node.name = String::from("..");
            node
        }))
    }

    fn named_dir(&self, cluster: u32) -> Option<Node> {
        let grand = match self.dotdot_cluster(&self.dir_node(cluster)).ok()? {
            0 => self.root(),
            c => self.dir_node(c),
        };
        let mut pos = 0;
        while let Some(e) = self.scan(&grand, &mut pos).ok()? {
            if e.node.is_dir && e.node.first_cluster == cluster {
                return Some(e.node);
            }
        }
        None
    }

    fn dotdot_cluster(&self, dir: &Node) -> Result<u32, FatError> {
        let mut pos = 0;
        while let Some(e) = self.raw_entry(dir, pos)? {
            if e[0] == ENTRY_END {
                break;
            }
            if &e[..11] == b"..         " && e[11] & ATTR_DIRECTORY != 0 {
                return Ok(self.entry_cluster(&e));
            }
            pos += DIR_ENTRY_SIZE;
        }
        Err(FatError::Corrupt("directory without a \"..\" entry"))
    }

    fn find_label(&self) -> String {
        let root = self.root();
        let mut pos = 0;
        while let Ok(Some(e)) = self.raw_entry(&root, pos) {
            if e[0] == ENTRY_END {
                break;
            }
            let attr = e[11];
            if e[0] != ENTRY_FREE
                && attr & ATTR_LONG_NAME_MASK != ATTR_LONG_NAME
                && attr & ATTR_VOLUME_ID != 0
            {
                let label = label_text(&e[..11]);
                if !label.is_empty() {
                    return label;
                }
            }
            pos += DIR_ENTRY_SIZE;
        }
        match &self.bpb_label {
            Some(raw) => label_text(raw),
            None => String::new(),
        }
    }

    /// The next live entry at or after `*pos`, with its long name assembled from the LFN
    /// entries before it.
    fn scan(&self, dir: &Node, pos: &mut u64) -> Result<Option<Entry>, FatError> {
        if !dir.is_dir {
            return Err(FatError::NotADirectory);
        }
        // Clamped first so a caller's arbitrary cursor cannot overflow the rounding.
        *pos = (*pos).min(MAX_DIR_BYTES).next_multiple_of(DIR_ENTRY_SIZE);
        let mut lfn = Lfn::new();
        while let Some(e) = self.raw_entry(dir, *pos)? {
            if e[0] == ENTRY_END {
                return Ok(None);
            }
            *pos += DIR_ENTRY_SIZE;
            if e[0] == ENTRY_FREE {
                lfn.reset();
                continue;
            }
            let attr = e[11];
            if attr & ATTR_LONG_NAME_MASK == ATTR_LONG_NAME {
                lfn.push(&e);
                continue;
            }
            let long = lfn.finish(&e);
            if attr & ATTR_VOLUME_ID != 0
                || &e[..11] == b".          "
                || &e[..11] == b"..         "
            {
                continue;
            }
            let short = short_name(&e, false);
            let name = long.unwrap_or_else(|| short_name(&e, true));
            let is_dir = attr & ATTR_DIRECTORY != 0;
            let node = Node {
                name,
                is_dir,
                first_cluster: self.entry_cluster(&e),
                size: if is_dir { 0 } else { u64::from(le32(&e, 28)) },
                attributes: attr,
                created: datetime(le16(&e, 16), le16(&e, 14), e[13]),
                modified: datetime(le16(&e, 24), le16(&e, 22), 0),
                accessed: datetime(le16(&e, 18), 0, 0),
            };
            return Ok(Some(Entry { node, short }));
        }
        Ok(None)
    }

    fn entry_cluster(&self, e: &[u8; 32]) -> u32 {
        // On FAT12/16 the high word is reserved (OS/2 used it for extended attributes).
        let hi = match self.fat_type {
            FatType::Fat32 => u32::from(le16(e, 20)) << 16,
            _ => 0,
        };
        hi | u32::from(le16(e, 26))
    }

    /// The 32-byte entry at byte `pos` of `dir`, or None past the directory's storage.
    fn raw_entry(&self, dir: &Node, pos: u64) -> Result<Option<[u8; 32]>, FatError> {
        if pos >= MAX_DIR_BYTES {
            return Ok(None);
        }
        let off = if dir.first_cluster == 0 && self.fat_type != FatType::Fat32 {
            if pos >= u64::from(self.root_entries) * DIR_ENTRY_SIZE {
                return Ok(None);
            }
            self.root_offset + pos
        } else {
            let first = match dir.first_cluster {
                0 => self.root_cluster,
                c => c,
            };
            let cs = u64::from(self.cluster_size);
            match self.cluster_at(first, pos / cs)? {
                Some(c) => self.cluster_offset(c) + pos % cs,
                None => return Ok(None),
            }
        };
        let mut e = [0u8; 32];
        self.cached_read(&self.dir_cache, DIR_WINDOW, DIR_SLOTS, off, &mut e)?;
        Ok(Some(e))
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset + u64::from(cluster.saturating_sub(2)) * u64::from(self.cluster_size)
    }

    fn check_cluster(&self, cluster: u32) -> Result<u32, FatError> {
        if cluster < 2 || cluster > self.cluster_count + 1 {
            return Err(FatError::Corrupt("cluster number out of range"));
        }
        Ok(cluster)
    }

    /// The `index`th cluster of the chain starting at `first`, or None if the chain ends
    /// before it.
    fn cluster_at(&self, first: u32, index: u64) -> Result<Option<u32>, FatError> {
        self.check_cluster(first)?;
        // No chain has more links than the volume has clusters; a longer one must loop.
        if index >= u64::from(self.cluster_count) {
            return Err(FatError::Corrupt("cluster chain longer than the volume"));
        }
        let (mut i, mut cluster) = match self.cursor_get(first, index) {
            Some(c) => (c.index, c.cluster),
            None => (0, first),
        };
        while i < index {
            match self.next_cluster(cluster)? {
                Some(next) => cluster = next,
                None => return Ok(None),
            }
            i += 1;
        }
        self.cursor_put(Cursor {
            first,
            index,
            cluster,
        });
        Ok(Some(cluster))
    }

    fn cursor_get(&self, first: u32, index: u64) -> Option<Cursor> {
        self.cursors
            .get()
            .into_iter()
            .flatten()
            .find(|c| c.first == first && c.index <= index)
    }

    fn cursor_put(&self, cursor: Cursor) {
        let mut all = self.cursors.get();
        let slot = all
            .iter()
            .position(|c| matches!(c, Some(c) if c.first == cursor.first))
            .unwrap_or(CURSORS - 1);
        all[..=slot].rotate_right(1);
        all[0] = Some(cursor);
        self.cursors.set(all);
    }

    fn next_cluster(&self, cluster: u32) -> Result<Option<u32>, FatError> {
        let value = self.fat_entry(cluster)?;
        let end_of_chain = match self.fat_type {
            FatType::Fat12 => 0xFF8,
            FatType::Fat16 => 0xFFF8,
            FatType::Fat32 => 0x0FFF_FFF8,
        };
        if value >= end_of_chain {
            return Ok(None);
        }
        if value == end_of_chain - 1 {
            return Err(FatError::Corrupt("bad cluster in a chain"));
        }
        if value == 0 {
            return Err(FatError::Corrupt("free cluster in a chain"));
        }
        self.check_cluster(value).map(Some)
    }

    /// `cluster` must have passed `check_cluster`, which keeps the read inside the FAT.
    fn fat_entry(&self, cluster: u32) -> Result<u32, FatError> {
        let c = u64::from(cluster);
        let (off, len) = match self.fat_type {
            FatType::Fat12 => (c + c / 2, 2),
            FatType::Fat16 => (c * 2, 2),
            FatType::Fat32 => (c * 4, 4),
        };
        let mut b = [0u8; 4];
        self.cached_read(
            &self.fat_cache,
            FAT_WINDOW,
            FAT_SLOTS,
            self.fat_offset + off,
            &mut b[..len],
        )?;
        let raw = u32::from_le_bytes(b);
        Ok(match self.fat_type {
            FatType::Fat12 if cluster & 1 == 1 => raw >> 4,
            FatType::Fat12 => raw & 0xFFF,
            FatType::Fat16 => raw,
            // The top four bits are reserved and must be ignored.
            FatType::Fat32 => raw & 0x0FFF_FFFF,
        })
    }

    fn cached_read(
        &self,
        cell: &Cell<Cache>,
        window: u64,
        max_slots: usize,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), FatError> {
        let mut cache = cell.take();
        let result = self.fill_from_cache(&mut cache, window, max_slots, offset, out);
        cell.set(cache);
        result
    }

    fn fill_from_cache(
        &self,
        cache: &mut Cache,
        window: u64,
        max_slots: usize,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), FatError> {
        let mut done = 0;
        while done < out.len() {
            let at = offset + done as u64;
            let base = at - at % window;
            match cache.slots.iter().position(|w| w.base == base) {
                Some(0) => {}
                Some(i) => {
                    let w = cache.slots.remove(i);
                    cache.slots.insert(0, w);
                }
                None => {
                    if base >= self.volume_bytes {
                        return Err(FatError::Corrupt("metadata beyond the end of the volume"));
                    }
                    let len = window.min(self.volume_bytes - base) as usize;
                    let mut data = if cache.slots.len() >= max_slots {
                        cache.slots.pop().map(|w| w.data).unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    data.resize(len, 0);
                    read_bytes(&self.dev, base, &mut data)?;
                    cache.slots.insert(0, Window { base, data });
                }
            }
            let Some(w) = cache.slots.first() else {
                return Err(FatError::Io);
            };
            let within = (at - base) as usize;
            if within >= w.data.len() {
                return Err(FatError::Corrupt("metadata beyond the end of the volume"));
            }
            let n = (w.data.len() - within).min(out.len() - done);
            out[done..done + n].copy_from_slice(&w.data[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn count_free(&self) -> Result<u32, FatError> {
        let entries = u64::from(self.cluster_count) + 2;
        let entries_per_chunk = match self.fat_type {
            FatType::Fat12 => FREE_SCAN_CHUNK as u64 * 2 / 3,
            FatType::Fat16 => FREE_SCAN_CHUNK as u64 / 2,
            FatType::Fat32 => FREE_SCAN_CHUNK as u64 / 4,
        };
        // Streamed in large chunks bypassing the cache: the whole FAT is read exactly once.
        let mut chunk = Vec::new();
        let mut free = 0u32;
        let mut start = 0u64;
        let mut first_entry = 0u64;
        while start < self.fat_used_bytes {
            let len = (self.fat_used_bytes - start).min(FREE_SCAN_CHUNK as u64) as usize;
            chunk.resize(len, 0);
            read_bytes(&self.dev, self.fat_offset + start, &mut chunk)?;
            let last_entry = (first_entry + entries_per_chunk).min(entries);
            for n in first_entry.max(2)..last_entry {
                let j = (n - first_entry) as usize;
                let value = match self.fat_type {
                    FatType::Fat12 => {
                        let raw = chunk_u16(&chunk, j + j / 2)?;
                        if j & 1 == 1 {
                            raw >> 4
                        } else {
                            raw & 0xFFF
                        }
                    }
                    FatType::Fat16 => chunk_u16(&chunk, j * 2)?,
                    FatType::Fat32 => chunk_u32(&chunk, j * 4)? & 0x0FFF_FFFF,
                };
                if value == 0 {
                    free += 1;
                }
            }
            start += len as u64;
            first_entry += entries_per_chunk;
        }
        Ok(free)
    }
}

fn chunk_u16(chunk: &[u8], at: usize) -> Result<u32, FatError> {
    match chunk.get(at..at + 2) {
        Some(b) => Ok(u32::from(le16(b, 0))),
        None => Err(FatError::Corrupt("FAT shorter than expected")),
    }
}

fn chunk_u32(chunk: &[u8], at: usize) -> Result<u32, FatError> {
    match chunk.get(at..at + 4) {
        Some(b) => Ok(le32(b, 0)),
        None => Err(FatError::Corrupt("FAT shorter than expected")),
    }
}

/// Only the root may have cluster 0; a subdirectory claiming it would alias the root and make
/// tree walks cycle.
fn is_broken_dir(node: &Node) -> bool {
    node.is_dir && node.first_cluster == 0
}

fn eq_ignore_case(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_uppercase)
        .eq(b.chars().flat_map(char::to_uppercase))
}

fn datetime(date: u16, time: u16, tenths: u8) -> DateTime {
    if date == 0 {
        return DateTime::default();
    }
    DateTime {
        year: 1980 + (date >> 9),
        month: ((date >> 5) & 0x0F) as u8,
        day: (date & 0x1F) as u8,
        hour: (time >> 11) as u8,
        minute: ((time >> 5) & 0x3F) as u8,
        // Times have 2-second granularity; creation times add 0-199 hundredths of a second.
        second: ((time & 0x1F) * 2) as u8 + tenths / 100,
    }
}

fn lfn_checksum(short: &[u8]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

const LFN_PARTS: usize = 20;
const LFN_UNITS_PER_ENTRY: usize = 13;
const LFN_UNIT_OFFSETS: [usize; LFN_UNITS_PER_ENTRY] =
    [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

/// Long-name entries precede their 8.3 entry in descending order (the first one flagged
/// 0x40); any gap, reordering or checksum mismatch means the LFN belongs to a deleted or
/// rewritten entry and must be ignored.
struct Lfn {
    units: [u16; LFN_PARTS * LFN_UNITS_PER_ENTRY],
    parts: u8,
    next: u8,
    checksum: u8,
    active: bool,
}

impl Lfn {
    fn new() -> Self {
        Lfn {
            units: [0; LFN_PARTS * LFN_UNITS_PER_ENTRY],
            parts: 0,
            next: 0,
            checksum: 0,
            active: false,
        }
    }

    fn reset(&mut self) {
        self.active = false;
    }

    fn push(&mut self, e: &[u8; 32]) {
        let seq = e[0] & 0x1F;
        if e[0] & 0x40 != 0 {
            if seq == 0 || usize::from(seq) > LFN_PARTS {
                self.active = false;
                return;
            }
            self.active = true;
            self.parts = seq;
            self.checksum = e[13];
        } else if !self.active || seq == 0 || seq != self.next || e[13] != self.checksum {
            self.active = false;
            return;
        }
        let base = usize::from(seq - 1) * LFN_UNITS_PER_ENTRY;
        for (k, &at) in LFN_UNIT_OFFSETS.iter().enumerate() {
            self.units[base + k] = le16(e, at);
        }
        self.next = seq - 1;
    }

    fn finish(&mut self, short: &[u8; 32]) -> Option<String> {
        let complete = self.active && self.next == 0 && self.checksum == lfn_checksum(&short[..11]);
        self.active = false;
        if !complete {
            return None;
        }
        let len = usize::from(self.parts) * LFN_UNITS_PER_ENTRY;
        // Names end at a NUL then pad with 0xFFFF; some writers skip the NUL.
        let units = self.units[..len]
            .iter()
            .copied()
            .take_while(|&u| u != 0 && u != 0xFFFF);
        let name: String = char::decode_utf16(units)
            .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect();
        (!name.is_empty()).then_some(name)
    }
}

/// "BASE.EXT" from the 11-byte field, lowercasing parts per the NT flags when `nt_case`.
fn short_name(e: &[u8; 32], nt_case: bool) -> String {
    let mut raw = [0u8; 11];
    raw.copy_from_slice(&e[..11]);
    // 0x05 stands for a real leading 0xE5, which would otherwise mean "deleted".
    if raw[0] == 0x05 {
        raw[0] = ENTRY_FREE;
    }
    let base = trim_spaces(&raw[..8]);
    let ext = trim_spaces(&raw[8..]);
    let mut name = String::with_capacity(12);
    push_oem(&mut name, base, nt_case && e[12] & NT_LOWER_BASE != 0);
    if !ext.is_empty() {
        name.push('.');
        push_oem(&mut name, ext, nt_case && e[12] & NT_LOWER_EXT != 0);
    }
    name
}

fn label_text(raw: &[u8]) -> String {
    let mut bytes = [0u8; 11];
    let n = raw.len().min(11);
    bytes[..n].copy_from_slice(&raw[..n]);
    if bytes[0] == 0x05 {
        bytes[0] = ENTRY_FREE;
    }
    let mut label = String::new();
    push_oem(&mut label, trim_spaces(&bytes[..n]), false);
    if label == "NO NAME" {
        label.clear();
    }
    label
}

fn trim_spaces(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
    &b[..end]
}

fn push_oem(out: &mut String, bytes: &[u8], lower: bool) {
    for &b in bytes {
        let b = if lower { b.to_ascii_lowercase() } else { b };
        out.push(oem_char(b));
    }
}

/// 8.3 names are in the OEM code page; 437 is what DOS, Windows (US) and Linux default to.
fn oem_char(b: u8) -> char {
    match b.checked_sub(0x80) {
        None => char::from(b),
        Some(i) => CP437_HIGH[usize::from(i)],
    }
}

const CP437_HIGH: [char; 128] = [
    'Ç', 'ü', 'é', 'â', 'ä', 'à', 'å', 'ç', 'ê', 'ë', 'è', 'ï', 'î', 'ì', 'Ä', 'Å', //
    'É', 'æ', 'Æ', 'ô', 'ö', 'ò', 'û', 'ù', 'ÿ', 'Ö', 'Ü', '¢', '£', '¥', '₧', 'ƒ', //
    'á', 'í', 'ó', 'ú', 'ñ', 'Ñ', 'ª', 'º', '¿', '⌐', '¬', '½', '¼', '¡', '«', '»', //
    '░', '▒', '▓', '│', '┤', '╡', '╢', '╖', '╕', '╣', '║', '╗', '╝', '╜', '╛', '┐', //
    '└', '┴', '┬', '├', '─', '┼', '╞', '╟', '╚', '╔', '╩', '╦', '╠', '═', '╬', '╧', //
    '╨', '╤', '╥', '╙', '╘', '╒', '╓', '╫', '╪', '┘', '┌', '█', '▄', '▌', '▐', '▀', //
    'α', 'ß', 'Γ', 'π', 'Σ', 'σ', 'µ', 'τ', 'Φ', 'Θ', 'Ω', 'δ', '∞', 'φ', 'ε', '∩', //
    '≡', '±', '≥', '≤', '⌠', '⌡', '÷', '≈', '°', '∙', '·', '√', 'ⁿ', '²', '■', '\u{a0}',
];
