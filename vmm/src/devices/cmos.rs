//! MC146818 CMOS real-time clock at ports 0x70/0x71, reading the host's UTC time.
//!
//! Without it a stock kernel's `rtc_cmos` driver reads 0xff everywhere, sees "update in progress"
//! forever and spends seconds of boot time before giving up; the guest would also start in 1970.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::BusDevice;

/// Index port; data port follows it.
pub const CMOS_PORT: u16 = 0x70;
/// Ports covered.
pub const PORT_COUNT: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// 32.768 kHz time base, 1024 Hz periodic rate; update-in-progress clear.
const STATUS_A: u8 = 0x26;
/// 24-hour mode, BCD values.
const STATUS_B: u8 = 0x02;
/// Valid RAM and time.
const STATUS_D: u8 = 0x80;

/// A calendar time in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    weekday: u8, // 1 = Sunday, as the RTC counts
}

/// Converts seconds since the Unix epoch to a UTC calendar time (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_unix(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u8,
        minute: (rem % 3600 / 60) as u8,
        second: (rem % 60) as u8,
        // 1970-01-01 was a Thursday (weekday 5 when Sunday is 1).
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
    }
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The CMOS device: 128 bytes of RAM plus the clock registers.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl Cmos {
    fn with_clock(now: fn() -> i64) -> Self {
        Self {
            index: 0,
            ram: [0; 128],
            now,
        }
    }

    fn register(&self, reg: u8) -> u8 {
        let t = civil_from_unix((self.now)());
        match reg {
            REG_SECONDS => bcd(t.second),
            REG_MINUTES => bcd(t.minute),
            REG_HOURS => bcd(t.hour),
            REG_WEEKDAY => bcd(t.weekday),
            REG_DAY => bcd(t.day),
            REG_MONTH => bcd(t.month),
            REG_YEAR => bcd(t.year.rem_euclid(100) as u8),
            REG_CENTURY => bcd(t.year.div_euclid(100).clamp(0, 99) as u8),
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D,
            r => self.ram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() == 1 && offset == 1 {
            data[0] = self.register(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            // Bit 7 of the index port gates NMIs; it is not part of the register number.
            0 => self.index = value & 0x7f,
            // Clock and status writes are ignored: the guest cannot set the host's clock.
            1 if self.index > REG_STATUS_D => self.ram[usize::from(self.index)] = *value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut d = [0u8];
        c.read(1, &mut d);
        d[0]
    }

    #[test]
    fn civil_conversion() {
        let epoch = civil_from_unix(0);
        assert_eq!(
            (epoch.year, epoch.month, epoch.day, epoch.weekday),
            (1970, 1, 1, 5)
        );
        // 2026-11-25 15:30:45 UTC, a Wednesday.
        let t = civil_from_unix(1_795_620_645);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2026, 11, 25, 15, 30, 45, 4)
        );
        // Leap day.
        let leap = civil_from_unix(951_782_400);
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn clock_registers_in_bcd() {
        let mut c = Cmos::with_clock(|| 1_795_620_645);
        assert_eq!(read(&mut c, REG_SECONDS), 0x45);
        assert_eq!(read(&mut c, REG_MINUTES), 0x30);
        assert_eq!(read(&mut c, REG_HOURS), 0x15);
        assert_eq!(read(&mut c, REG_DAY), 0x25);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(
            read(&mut c, REG_STATUS_A) & 0x80,
            0,
            "update never in progress"
        );
        assert_eq!(read(&mut c, REG_STATUS_B), STATUS_B);
    }

    #[test]
    fn ram_is_writable_but_clock_is_not() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x59]);
        assert_eq!(read(&mut c, REG_SECONDS), 0x00);
        let mut wide = [0u8; 2];
        c.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
