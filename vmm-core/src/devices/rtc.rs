//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71 (data).
//!
//! The time registers show the host's UTC clock plus an offset: when the guest sets the clock
//! (`hwclock -w`), the difference to the host clock is kept, so the guest's clock then runs on
//! from what it wrote. Status register B selects BCD or binary and 12- or 24-hour encoding.
//! Index 0x32 holds the century (the FADT's `CENTURY` field should name it). The other indices
//! are 128 bytes of plain CMOS RAM. No RTC interrupts are generated (status C always reads 0),
//! and the update-in-progress bit never reads as set.

#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
/// The century register (ACPI FADT `CENTURY`, also what Linux and SeaBIOS use).
pub const CENTURY: u8 = 0x32;

/// Status A: update in progress (read-only here, never set).
const A_UIP: u8 = 0x80;
/// Status A reset value: 32.768 kHz time base (divider 010), 1024 Hz periodic rate (0110).
const A_DEFAULT: u8 = 0x26;
/// Status B: SET halts updates so the time can be written.
const B_SET: u8 = 0x80;
/// Status B: update-ended interrupt enable (cleared when SET is set).
const B_UIE: u8 = 0x10;
/// Status B: data mode binary (else BCD).
const B_DM_BINARY: u8 = 0x04;
/// Status B: 24-hour mode (else 12-hour with bit 7 of the hours register meaning PM).
const B_24H: u8 = 0x02;
/// Status B reset value: 24-hour, BCD.
const B_DEFAULT: u8 = B_24H;
/// Status D: valid RAM and time.
const D_VRT: u8 = 0x80;
/// 12-hour mode: PM flag in the hours register.
const HOURS_PM: u8 = 0x80;

const CMOS_SIZE: usize = 128;
const INDEX_MASK: u8 = 0x7f;
/// Index port bit 7: the PC's NMI mask (ignored).
#[cfg(test)]
const NMI_DISABLE: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;

/// Days since 1970-01-01 of the proleptic Gregorian date `year-month-day` (Howard Hinnant's
/// `days_from_civil`). Out-of-range days roll over (February 30th is March 1st or 2nd).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `(year, month, day)` of a day count since 1970-01-01 (`civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1..=31, 1..=12).
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

/// A broken-down UTC time as the RTC registers hold it (binary values, 24-hour clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl DateTime {
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let part = |v: i64| u32::try_from(v).unwrap_or(0);
        Self {
            year,
            month,
            day,
            hour: part(sod / 3600),
            minute: part(sod / 60 % 60),
            second: part(sod % 60),
        }
    }

    /// Seconds since the epoch; fields out of range carry over (minute 61 is the next hour's
    /// first minute), months are clamped to 1..=12.
    pub fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month.clamp(1, 12), self.day);
        days * SECS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// Day of the week, 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub fn weekday(self) -> u32 {
        let days = self.to_unix().div_euclid(SECS_PER_DAY);
        // 1970-01-01 was a Thursday (day 5 counting from Sunday = 1).
        u32::try_from((days + 4).rem_euclid(7) + 1).unwrap_or(1)
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// Source of host time in seconds since the epoch (injectable for tests).
pub type Clock = Box<dyn Fn() -> i64 + Send>;

fn host_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The CMOS RTC bus device; insert it at `ports::RTC` with length `ports::RTC_LEN`.
pub struct Rtc {
    index: u8,
    ram: [u8; CMOS_SIZE],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// The time registers while status B's SET bit halts updates.
    frozen: Option<DateTime>,
    clock: Clock,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC that follows the host's clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(host_clock))
    }

    /// An RTC that follows `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        let mut ram = [0u8; CMOS_SIZE];
        ram[usize::from(STATUS_A)] = A_DEFAULT;
        ram[usize::from(STATUS_B)] = B_DEFAULT;
        ram[usize::from(STATUS_D)] = D_VRT;
        Self {
            index: 0,
            ram,
            offset: 0,
            frozen: None,
            clock,
        }
    }

    fn status_b(&self) -> u8 {
        self.ram[usize::from(STATUS_B)]
    }

    fn now(&self) -> DateTime {
        self.frozen
            .unwrap_or_else(|| DateTime::from_unix((self.clock)().saturating_add(self.offset)))
    }

    fn encode(&self, v: u32) -> u8 {
        // Every field fits a byte (at most 99 after the callers' reductions).
        let v = u8::try_from(v).unwrap_or(0);
        if self.status_b() & B_DM_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        u32::from(if self.status_b() & B_DM_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        })
    }

    fn encode_hours(&self, hour: u32) -> u8 {
        if self.status_b() & B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        self.encode(h12) | pm
    }

    fn decode_hours(&self, v: u8) -> u32 {
        if self.status_b() & B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & !HOURS_PM) % 12;
        if v & HOURS_PM != 0 { h12 + 12 } else { h12 }
    }

    fn century_and_year(year: i64) -> (u32, u32) {
        let c = u32::try_from(year.div_euclid(100).clamp(0, 99)).unwrap_or(0);
        let y = u32::try_from(year.rem_euclid(100)).unwrap_or(0);
        (c, y)
    }

    fn read_reg(&mut self, index: u8) -> u8 {
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                let t = self.now();
                let (century, year) = Self::century_and_year(t.year);
                match index {
                    SECONDS => self.encode(t.second),
                    MINUTES => self.encode(t.minute),
                    HOURS => self.encode_hours(t.hour),
                    WEEKDAY => self.encode(t.weekday()),
                    DAY => self.encode(t.day),
                    MONTH => self.encode(t.month),
                    YEAR => self.encode(year),
                    _ => self.encode(century),
                }
            }
            STATUS_A => self.ram[usize::from(STATUS_A)] & !A_UIP,
            STATUS_C => {
                // Interrupt flags, cleared by reading; none are ever raised.
                let v = self.ram[usize::from(STATUS_C)];
                self.ram[usize::from(STATUS_C)] = 0;
                v
            }
            STATUS_D => D_VRT,
            _ => self.ram[usize::from(index)],
        }
    }

    fn write_time_field(&mut self, index: u8, value: u8) {
        let mut t = self.now();
        match index {
            SECONDS => t.second = self.decode(value).min(59),
            MINUTES => t.minute = self.decode(value).min(59),
            HOURS => t.hour = self.decode_hours(value).min(23),
            DAY => t.day = self.decode(value).clamp(1, 31),
            MONTH => t.month = self.decode(value).clamp(1, 12),
            YEAR => {
                let (century, _) = Self::century_and_year(t.year);
                t.year = i64::from(century) * 100 + i64::from(self.decode(value) % 100);
            }
            CENTURY => {
                let (_, year) = Self::century_and_year(t.year);
                t.year = i64::from(self.decode(value) % 100) * 100 + i64::from(year);
            }
            // The weekday is derived from the date.
            _ => return,
        }
        if self.frozen.is_some() {
            // Keep the fields as written: the guest may pass through invalid dates (day 31
            // before it sets the month) until it releases SET.
            self.frozen = Some(t);
        } else {
            self.offset = t.to_unix() - (self.clock)();
        }
    }

    fn write_reg(&mut self, index: u8, value: u8) {
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                self.write_time_field(index, value);
            }
            STATUS_A => self.ram[usize::from(STATUS_A)] = value & !A_UIP,
            STATUS_B => {
                let old = self.status_b();
                let mut value = value;
                if value & B_SET != 0 {
                    value &= !B_UIE;
                    if old & B_SET == 0 {
                        self.frozen = Some(self.now());
                    }
                } else if let Some(t) = self.frozen.take() {
                    self.offset = t.to_unix() - (self.clock)();
                }
                self.ram[usize::from(STATUS_B)] = value;
            }
            STATUS_C | STATUS_D => {}
            _ => self.ram[usize::from(index)] = value,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (port, b) in (offset..).zip(data.iter_mut()) {
            *b = match port {
                // The index port is write-only.
                1 => self.read_reg(self.index),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (port, &v) in (offset..).zip(data.iter()) {
            match port {
                // Bit 7 masks NMIs on a PC; the core never injects any, so it is dropped.
                0 => self.index = v & INDEX_MASK,
                1 => self.write_reg(self.index, v),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_EVE: i64 = 1_709_251_198;

    fn rtc_at(t: i64) -> (Rtc, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(t));
        let n = Arc::clone(&now);
        (
            Rtc::with_clock(Box::new(move || n.load(Ordering::SeqCst))),
            now,
        )
    }

    fn get(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    fn set(rtc: &mut Rtc, index: u8, v: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[v]);
    }

    #[test]
    fn civil_conversions() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2000 is a leap year (divisible by 400), 1900 and 2100 are not.
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28),
            1
        );
        assert_eq!(
            days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28),
            1
        );
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // Feb 30th rolls over.
        assert_eq!(days_from_civil(2023, 2, 30), days_from_civil(2023, 3, 2));
        // Round trip over four centuries, a day at a time.
        let start = days_from_civil(1899, 12, 25);
        for d in start..start + 146_097 + 10 {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn broken_down_time_and_weekday() {
        let t = DateTime::from_unix(LEAP_EVE);
        assert_eq!(
            t,
            DateTime {
                year: 2024,
                month: 2,
                day: 29,
                hour: 23,
                minute: 59,
                second: 58
            }
        );
        assert_eq!(t.weekday(), 5, "Thursday");
        assert_eq!(t.to_unix(), LEAP_EVE);
        assert_eq!(
            DateTime::from_unix(0).weekday(),
            5,
            "1970-01-01 was a Thursday"
        );
        // 2000-01-01 00:00:00 was a Saturday.
        assert_eq!(DateTime::from_unix(946_684_800).weekday(), 7);
    }

    #[test]
    fn reads_host_time_in_bcd_24h_by_default() {
        let (mut rtc, _) = rtc_at(LEAP_EVE);
        assert_eq!(get(&mut rtc, SECONDS), 0x58);
        assert_eq!(get(&mut rtc, MINUTES), 0x59);
        assert_eq!(get(&mut rtc, HOURS), 0x23);
        assert_eq!(get(&mut rtc, WEEKDAY), 0x05);
        assert_eq!(get(&mut rtc, DAY), 0x29);
        assert_eq!(get(&mut rtc, MONTH), 0x02);
        assert_eq!(get(&mut rtc, YEAR), 0x24);
        assert_eq!(get(&mut rtc, CENTURY), 0x20);
        assert_eq!(get(&mut rtc, STATUS_D), 0x80);
        assert_eq!(get(&mut rtc, STATUS_A) & A_UIP, 0);
        assert_eq!(get(&mut rtc, STATUS_A), A_DEFAULT);
    }

    #[test]
    fn time_follows_the_clock_across_the_leap_day_and_century() {
        let (mut rtc, now) = rtc_at(LEAP_EVE);
        now.store(LEAP_EVE + 2, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, DAY), 0x01);
        assert_eq!(get(&mut rtc, MONTH), 0x03);
        assert_eq!(get(&mut rtc, WEEKDAY), 0x06);
        // 1999-12-31 23:59:59 then 2000-01-01 00:00:00.
        now.store(946_684_799, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, YEAR), 0x99);
        assert_eq!(get(&mut rtc, CENTURY), 0x19);
        now.store(946_684_800, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, YEAR), 0x00);
        assert_eq!(get(&mut rtc, CENTURY), 0x20);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let (mut rtc, now) = rtc_at(LEAP_EVE);
        set(&mut rtc, STATUS_B, B_DM_BINARY); // binary, 12-hour
        assert_eq!(get(&mut rtc, SECONDS), 58);
        assert_eq!(get(&mut rtc, HOURS), 11 | HOURS_PM);
        assert_eq!(get(&mut rtc, YEAR), 24);
        assert_eq!(get(&mut rtc, CENTURY), 20);
        set(&mut rtc, STATUS_B, 0); // BCD, 12-hour
        assert_eq!(get(&mut rtc, HOURS), 0x11 | HOURS_PM);
        now.store(LEAP_EVE + 2, Ordering::SeqCst); // midnight is 12 AM
        assert_eq!(get(&mut rtc, HOURS), 0x12);
        now.store(LEAP_EVE + 2 + 12 * 3600, Ordering::SeqCst); // noon is 12 PM
        assert_eq!(get(&mut rtc, HOURS), 0x12 | HOURS_PM);
    }

    #[test]
    fn guest_set_time_is_kept_as_an_offset() {
        let (mut rtc, now) = rtc_at(LEAP_EVE);
        // What Linux's mc146818_set_time does: SET, write year..seconds, release SET.
        set(&mut rtc, STATUS_B, B_24H | B_SET);
        now.store(LEAP_EVE + 5, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, SECONDS), 0x58, "SET halts the clock");
        set(&mut rtc, YEAR, 0x99);
        set(&mut rtc, CENTURY, 0x19);
        set(&mut rtc, MONTH, 0x12);
        set(&mut rtc, DAY, 0x31);
        set(&mut rtc, HOURS, 0x23);
        set(&mut rtc, MINUTES, 0x59);
        set(&mut rtc, SECONDS, 0x50);
        set(&mut rtc, STATUS_B, B_24H);
        assert_eq!(get(&mut rtc, SECONDS), 0x50);
        now.store(LEAP_EVE + 15, Ordering::SeqCst);
        // 1999-12-31 23:59:50 + 10 s.
        assert_eq!(get(&mut rtc, SECONDS), 0x00);
        assert_eq!(get(&mut rtc, YEAR), 0x00);
        assert_eq!(get(&mut rtc, CENTURY), 0x20);
        assert_eq!(get(&mut rtc, MONTH), 0x01);
        assert_eq!(get(&mut rtc, WEEKDAY), 0x07);
    }

    #[test]
    fn invalid_intermediate_dates_while_set_are_not_normalised_early() {
        let (mut rtc, _) = rtc_at(days_from_civil(2023, 1, 31) * SECS_PER_DAY);
        set(&mut rtc, STATUS_B, B_24H | B_SET);
        set(&mut rtc, MONTH, 0x02); // "February 31st" for a moment
        set(&mut rtc, DAY, 0x15);
        set(&mut rtc, STATUS_B, B_24H);
        assert_eq!(get(&mut rtc, MONTH), 0x02);
        assert_eq!(get(&mut rtc, DAY), 0x15);
    }

    #[test]
    fn single_writes_without_set_apply_at_once() {
        let (mut rtc, _) = rtc_at(LEAP_EVE);
        set(&mut rtc, STATUS_B, B_24H | B_DM_BINARY);
        set(&mut rtc, MINUTES, 7);
        assert_eq!(get(&mut rtc, MINUTES), 7);
        assert_eq!(get(&mut rtc, HOURS), 23);
        assert_eq!(get(&mut rtc, SECONDS), 58);
    }

    #[test]
    fn index_port_nmi_bit_and_cmos_ram() {
        let (mut rtc, _) = rtc_at(LEAP_EVE);
        // The NMI-mask bit does not take part in selecting the register.
        rtc.write(0, &[NMI_DISABLE | 0x40]);
        rtc.write(1, &[0xab]);
        rtc.write(0, &[0x40]);
        let mut b = [0];
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0xab);
        assert_eq!(get(&mut rtc, 0x7f), 0);
        set(&mut rtc, 0x7f, 0x5a);
        assert_eq!(get(&mut rtc, 0x7f), 0x5a);
        // Status C and D are read-only; A's UIP bit cannot be set.
        set(&mut rtc, STATUS_D, 0);
        assert_eq!(get(&mut rtc, STATUS_D), 0x80);
        set(&mut rtc, STATUS_C, 0xf0);
        assert_eq!(get(&mut rtc, STATUS_C), 0);
        set(&mut rtc, STATUS_A, 0xa6);
        assert_eq!(get(&mut rtc, STATUS_A), 0x26);
        rtc.read(0, &mut b);
        assert_eq!(b[0], 0xff, "index port reads as open bus");
    }
}
