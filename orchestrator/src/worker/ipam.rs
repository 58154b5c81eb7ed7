//! Addresses for VMs: each worker hands out the addresses of its own subnet. The bridge holds the
//! first host address (the VMs' gateway); VMs get the others, lowest free first. What is taken is
//! what the worker's VM records hold, so allocations survive an agent restart.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 subnet, `10.124.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid subnet {0:?}: expected an IPv4 network like 10.124.1.0/24 with a prefix of 8 to 30 bits and no host bits set")]
pub struct SubnetError(String);

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Subnet, SubnetError> {
        let err = || SubnetError(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let network: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        if !(8..=30).contains(&prefix) {
            return Err(err());
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask_bits() != 0 {
            return Err(err());
        }
        Ok(subnet)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Subnet {
    fn mask_bits(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The bridge's address, which VMs use as their gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether `ip` is a VM address of this subnet.
    pub fn is_vm_address(&self, ip: Ipv4Addr) -> bool {
        let (first, last) = self.vm_range();
        (first..=last).contains(&u32::from(ip))
    }

    fn vm_range(&self) -> (u32, u32) {
        let net = u32::from(self.network);
        let broadcast = net | !self.mask_bits();
        (net + 2, broadcast - 1)
    }

    /// The lowest VM address not in `taken`, or None when the subnet is full.
    pub fn allocate(&self, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (first, last) = self.vm_range();
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| !taken.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let s: Subnet = "10.124.1.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 124, 1, 1));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.to_string(), "10.124.1.0/24");
        for bad in [
            "10.124.1.1/24",
            "10.124.1.0",
            "10.124.1.0/31",
            "x/24",
            "10.0.0.0/7",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn allocates_lowest_free_and_stops_when_full() {
        let s: Subnet = "192.168.7.0/30".parse().unwrap();
        let mut taken = BTreeSet::new();
        let a = s.allocate(&taken).unwrap();
        assert_eq!(a, Ipv4Addr::new(192, 168, 7, 2));
        taken.insert(a);
        assert_eq!(s.allocate(&taken), None, "a /30 has one VM address");
        let s: Subnet = "10.0.0.0/24".parse().unwrap();
        let taken: BTreeSet<_> = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 4)].into();
        assert_eq!(s.allocate(&taken), Some(Ipv4Addr::new(10, 0, 0, 3)));
        assert!(s.is_vm_address(Ipv4Addr::new(10, 0, 0, 254)));
        assert!(!s.is_vm_address(Ipv4Addr::new(10, 0, 0, 255)));
        assert!(!s.is_vm_address(Ipv4Addr::new(10, 0, 0, 1)));
    }
}
