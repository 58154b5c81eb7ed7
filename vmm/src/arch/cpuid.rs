//! The CPUID a vCPU sees: KVM's supported set, filtered by a policy and given a topology.
//!
//! The policy is plain data so it can be unit-tested without KVM and later set from config.

use kvm_bindings::kvm_cpuid_entry2;

/// Which CPU features a guest must not see, beyond what KVM already filters out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidPolicy {
    /// Hide the performance-monitoring unit (leaf 0xA, AMD PerfCtrExtCore): the perf MSRs are not
    /// emulated on every host, and a guest NMI watchdog on a missing PMU faults.
    pub hide_pmu: bool,
    /// Hide MONITOR/MWAIT: an idle guest must HLT (and exit) rather than spin in MWAIT.
    pub hide_mwait: bool,
    /// Hide AMD topology extensions (leaf 0x8000_001E): we describe topology through leaf 0xB.
    pub hide_topoext: bool,
    /// Extra `(leaf, register, bit)` features to clear, for hosts that cannot virtualize them.
    pub hidden_bits: Vec<(u32, CpuidReg, u8)>,
}

impl Default for CpuidPolicy {
    fn default() -> Self {
        Self {
            hide_pmu: true,
            hide_mwait: true,
            hide_topoext: true,
            hidden_bits: Vec::new(),
        }
    }
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidReg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: CpuidReg) -> &mut u32 {
    match reg {
        CpuidReg::Eax => &mut e.eax,
        CpuidReg::Ebx => &mut e.ebx,
        CpuidReg::Ecx => &mut e.ecx,
        CpuidReg::Edx => &mut e.edx,
    }
}

const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
const EXT1_ECX_PERFCTR_CORE: u32 = 1 << 23;
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;
const LEAF_B_LEVEL_SMT: u32 = 1;
const LEAF_B_LEVEL_CORE: u32 = 2;

/// Topology of the guest: `cpus` single-threaded cores in one socket, APIC ID = vCPU index.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// This vCPU's index (and APIC ID).
    pub cpu_index: u8,
    /// Number of vCPUs.
    pub cpus: u8,
}

/// Bits needed to number `n` cores in the APIC ID.
fn apic_id_shift(n: u8) -> u32 {
    (n.max(1) as u32).next_power_of_two().trailing_zeros()
}

/// Applies `policy` and `topo` to the entries KVM reports as supported, in place.
/// `tsc_deadline` says whether KVM can emulate the TSC-deadline timer.
pub fn apply(
    entries: &mut Vec<kvm_cpuid_entry2>,
    policy: &CpuidPolicy,
    topo: Topology,
    tsc_deadline: bool,
) {
    let shift = apic_id_shift(topo.cpus);
    let apic_id = u32::from(topo.cpu_index);
    // Leaf 0xB is rebuilt from scratch below.
    entries.retain(|e| e.function != 0xb);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (apic_id << 24) | (u32::from(topo.cpus) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if policy.hide_mwait {
                    e.ecx &= !LEAF1_ECX_MONITOR;
                }
                if topo.cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Intel deterministic cache parameters: cores per package in EAX[31:26].
                e.eax = (e.eax & 0x03ff_ffff) | ((u32::from(topo.cpus.max(1)) - 1) << 26);
                // Caches are per core: EAX[25:14] = threads sharing the cache - 1 = 0 for L1/L2,
                // all cores for L3 and above.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    u32::from(topo.cpus.max(1)) - 1
                } else {
                    0
                };
                e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
            }
            0x6 => {
                // No power management (APERF/MPERF, HWP) inside a VM.
                e.ecx &= !1;
                e.eax = 0;
            }
            0xa if policy.hide_pmu => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0001 => {
                if policy.hide_topoext {
                    e.ecx &= !EXT1_ECX_TOPOEXT;
                }
                if policy.hide_pmu {
                    e.ecx &= !EXT1_ECX_PERFCTR_CORE;
                }
            }
            0x8000_0008 => {
                // AMD: NC = cores - 1 in ECX[7:0], APIC ID size in ECX[15:12].
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (u32::from(topo.cpus.max(1)) - 1);
            }
            0x8000_001e if policy.hide_topoext => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    for &(leaf, reg, bit) in &policy.hidden_bits {
        for e in entries.iter_mut().filter(|e| e.function == leaf) {
            *reg_mut(e, reg) &= !(1u32 << bit);
        }
    }
    // Extended topology: level 0 = SMT (one thread per core), level 1 = cores, then invalid.
    let leaf_b = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function: 0xb,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    entries.push(leaf_b(0, 0, 1, LEAF_B_LEVEL_SMT));
    entries.push(leaf_b(1, shift, u32::from(topo.cpus), LEAF_B_LEVEL_CORE));
    entries.push(leaf_b(2, 0, 0, 0));
    // Leaf 0 must advertise at least 0xB for the guest to read it.
    if let Some(e) = entries.iter_mut().find(|e| e.function == 0) {
        e.eax = e.eax.max(0xb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0xd, 0, 0, 0]),
            entry(
                1,
                0,
                [0x800f12, 0x0000_0800, LEAF1_ECX_MONITOR, LEAF1_EDX_HTT],
            ),
            entry(0xa, 0, [0x0403_0802, 0, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(
                0x8000_0001,
                0,
                [0, 0, EXT1_ECX_TOPOEXT | EXT1_ECX_PERFCTR_CORE | 1, 0],
            ),
            entry(0x8000_0008, 0, [0x3030, 0, 0xffff, 0]),
            entry(0x8000_001e, 0, [9, 9, 9, 9]),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn topology_and_hypervisor_bit() {
        let mut e = supported();
        apply(
            &mut e,
            &CpuidPolicy::default(),
            Topology {
                cpu_index: 2,
                cpus: 4,
            },
            true,
        );
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 2));
        assert_eq!(find(&e, 0xb, 0).ebx, 1);
        assert_eq!(find(&e, 0xb, 2).ecx >> 8, 0);
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, 3);
        assert_eq!((find(&e, 0x8000_0008, 0).ecx >> 12) & 0xf, 2);
    }

    #[test]
    fn default_policy_hides_pmu_mwait_topoext() {
        let mut e = supported();
        apply(
            &mut e,
            &CpuidPolicy::default(),
            Topology {
                cpu_index: 0,
                cpus: 1,
            },
            false,
        );
        assert_eq!(find(&e, 0xa, 0).eax, 0);
        assert_eq!(find(&e, 1, 0).ecx & LEAF1_ECX_MONITOR, 0);
        assert_eq!(find(&e, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&e, 1, 0).edx & LEAF1_EDX_HTT, 0);
        let ext = find(&e, 0x8000_0001, 0);
        assert_eq!(ext.ecx & (EXT1_ECX_TOPOEXT | EXT1_ECX_PERFCTR_CORE), 0);
        assert_eq!(ext.ecx & 1, 1, "unrelated bits stay");
        assert_eq!(find(&e, 0x8000_001e, 0).ebx, 0);
    }

    #[test]
    fn permissive_policy_keeps_features_and_extra_bits_are_cleared() {
        let mut e = supported();
        let policy = CpuidPolicy {
            hide_pmu: false,
            hide_mwait: false,
            hide_topoext: false,
            hidden_bits: vec![(0x8000_0001, CpuidReg::Ecx, 0)],
        };
        apply(
            &mut e,
            &policy,
            Topology {
                cpu_index: 0,
                cpus: 1,
            },
            false,
        );
        assert_eq!(find(&e, 0xa, 0).eax, 0x0403_0802);
        assert_ne!(find(&e, 1, 0).ecx & LEAF1_ECX_MONITOR, 0);
        let ext = find(&e, 0x8000_0001, 0);
        assert_eq!(ext.ecx, EXT1_ECX_TOPOEXT | EXT1_ECX_PERFCTR_CORE);
    }

    #[test]
    fn apic_id_shift_rounds_up() {
        assert_eq!(apic_id_shift(1), 0);
        assert_eq!(apic_id_shift(2), 1);
        assert_eq!(apic_id_shift(3), 2);
        assert_eq!(apic_id_shift(64), 6);
    }
}
