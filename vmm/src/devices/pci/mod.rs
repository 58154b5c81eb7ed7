//! PCI: configuration space, the root complex on bus 0 (host bridge, device slots, BAR mapping),
//! configuration access through ports 0xCF8/0xCFC and through ECAM, and the bus's snapshot state.

pub mod config;
pub mod msix;
pub mod persist;
pub mod root;

pub use config::{Bar, PciConfig, PciId};
pub use root::{PciConfigIo, PciDevice, PciEcam, PciRoot};
