//! Pad control (PADCTL) check of header pins: is the pad muxed as a GPIO in the direction edge-ad
//! drives it? (line-side reference §3.3)
//!
//! On Jetson a line request on a pad muxed to its special function (SFIO), or tristated,
//! **succeeds**, yet the value never reaches the pin; JetPack 6 ships most header pins that way.
//! Only the pad's PADCTL register tells. Register addresses and bit meanings are NVIDIA's, as
//! Jetson.GPIO decodes them (`gpio_pin_data.py`, `gpio.py`); Xavier entries carry none, so there
//! is no check on Xavier. Reading needs `/dev/mem` (root): the unit's privileged `ExecStartPre`
//! runs `edge-ad pinmux-check`, which writes a report the unprivileged daemon reads.

use std::path::Path;

/// PADCTL addresses of header pins (Jetson.GPIO, line-side reference §3.3): Orin Nano and NX
/// share a carrier pinout.
const PADCTL: [(&[&str], u8, u64); 7] = [
    (&["orin-nano", "orin-nx"], 7, 0x0244_8030),
    (&["orin-nano", "orin-nx"], 29, 0x0243_0068),
    (&["orin-nano", "orin-nx"], 31, 0x0243_0070),
    (&["orin-nano", "orin-nx"], 32, 0x0243_4080),
    (&["orin-nano", "orin-nx"], 33, 0x0243_4040),
    (&["agx-orin"], 7, 0x0243_0070),
    (&["agx-orin"], 16, 0x0C30_3048),
];

/// The PADCTL register address of header `pin` on board profile `board`, where NVIDIA's tables
/// give one.
pub fn padctl_address(board: &str, pin: u8) -> Option<u64> {
    PADCTL
        .iter()
        .find(|(boards, p, _)| boards.contains(&board) && *p == pin)
        .map(|e| e.2)
}

/// How edge-ad uses a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Trigger input.
    Input,
    /// PLC output.
    Output,
}

/// A PADCTL register value, decoded (bits as Jetson.GPIO reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padctl(pub u32);

impl Padctl {
    /// Bit 10: the pad is routed to its special function (SFIO), not to the GPIO controller.
    pub fn sfio(self) -> bool {
        self.0 & (1 << 10) != 0
    }
    /// Bit 4: the output driver is off.
    pub fn tristate(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// Bit 6: the input buffer is on.
    pub fn input_enabled(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    /// Bits 3:2: `none`, `down`, `up` (3 is reserved).
    pub fn pull(self) -> &'static str {
        match (self.0 >> 2) & 3 {
            0 => "none",
            1 => "down",
            2 => "up",
            _ => "reserved",
        }
    }

    /// Why this pad cannot serve `direction`, if it cannot: outputs need GPIO and the driver on
    /// (bit 10 = 0, bit 4 = 0), inputs need GPIO and the input buffer on (bit 10 = 0, bit 6 = 1).
    pub fn problem(self, direction: Direction) -> Option<&'static str> {
        if self.sfio() {
            return Some("selects SFIO");
        }
        match direction {
            Direction::Output if self.tristate() => Some("is tristated (output driver off)"),
            Direction::Input if !self.input_enabled() => Some("has its input buffer disabled"),
            _ => None,
        }
    }
}

/// What the check says of one pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PadCheck {
    /// Header pin.
    pub pin: u8,
    /// Tegra port, e.g. `PQ.06`.
    pub port: String,
    /// GPIO chip label.
    pub chip: String,
    /// Line offset.
    pub line: u32,
    /// Direction edge-ad needs.
    pub direction: Direction,
    /// Register address.
    pub address: u64,
    /// Register value.
    pub value: Padctl,
}

impl PadCheck {
    /// `None` when the pad serves its direction; otherwise the `E_PINMUX` message, which says
    /// how to fix it (line-side reference §3.3).
    pub fn error(&self) -> Option<String> {
        let why = self.value.problem(self.direction)?;
        let dir = match self.direction {
            Direction::Input => "input",
            Direction::Output => "output",
        };
        Some(format!(
            "E_PINMUX: header pin {} ({}, {} line {}): PADCTL {:#010x} = {:#010x} {why}; configure it as GPIO {dir} (Jetson-IO or a pinmux overlay) and reboot; {}",
            self.pin,
            self.port,
            self.chip,
            self.line,
            self.address,
            self.value.0,
            match self.direction {
                Direction::Output => "the output would not reach the pin.",
                Direction::Input => "the trigger would never be seen.",
            }
        ))
    }
}

/// Read one 32-bit register at physical `address` through `mem` (`/dev/mem`; any file in tests),
/// mapping only the page that holds it, read-only.
pub fn read_u32(mem: &Path, address: u64) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    if !address.is_multiple_of(4) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{address:#x} is not 4-byte aligned"),
        ));
    }
    let file = std::fs::File::open(mem)?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let base = address - address % page;
    let within = (address - base) as usize;
    // A regular file (tests) must cover the page: touching a mapping past its end is SIGBUS.
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() < base + page {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} ends before {address:#x}", mem.display()),
        ));
    }
    // SAFETY: a fresh read-only shared mapping of one page of an open file; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            base as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `within + 4 <= page` (aligned address inside the page); a device register must be
    // read with one volatile 32-bit load.
    let value = unsafe { std::ptr::read_volatile((ptr as *const u8).add(within) as *const u32) };
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(ptr, page as usize) };
    Ok(u32::from_le(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values as documented: 0x454 = SFIO + input + tristate (the reference's example message).
    #[test]
    fn decoding_and_verdicts() {
        let sfio = Padctl(0x0000_0454);
        assert!(sfio.sfio() && sfio.tristate() && sfio.input_enabled());
        assert_eq!(sfio.pull(), "down");
        assert_eq!(sfio.problem(Direction::Output), Some("selects SFIO"));
        let gpio_out = Padctl(0x0000_0008);
        assert_eq!(gpio_out.problem(Direction::Output), None);
        assert_eq!(gpio_out.pull(), "up");
        assert_eq!(
            gpio_out.problem(Direction::Input),
            Some("has its input buffer disabled")
        );
        let gpio_in = Padctl(0x0000_0050);
        assert_eq!(gpio_in.problem(Direction::Input), None);
        assert_eq!(
            gpio_in.problem(Direction::Output),
            Some("is tristated (output driver off)")
        );
        let c = PadCheck {
            pin: 31,
            port: "PQ.06".into(),
            chip: "tegra234-gpio".into(),
            line: 106,
            direction: Direction::Output,
            address: 0x0243_0070,
            value: sfio,
        };
        assert_eq!(
            c.error().unwrap(),
            "E_PINMUX: header pin 31 (PQ.06, tegra234-gpio line 106): PADCTL 0x02430070 = 0x00000454 selects SFIO; configure it as GPIO output (Jetson-IO or a pinmux overlay) and reboot; the output would not reach the pin."
        );
    }

    #[test]
    fn addresses_of_the_documented_pins() {
        assert_eq!(padctl_address("orin-nano", 31), Some(0x0243_0070));
        assert_eq!(padctl_address("orin-nx", 7), Some(0x0244_8030));
        assert_eq!(padctl_address("agx-orin", 16), Some(0x0C30_3048));
        assert_eq!(padctl_address("xavier-nx", 31), None);
        assert_eq!(padctl_address("orin-nano", 12), None);
    }

    /// A sparse file stands in for `/dev/mem`: the value comes from the exact physical offset.
    #[test]
    fn reads_the_register_at_its_physical_offset() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("edge-ad-pinmux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = dir.join("mem");
        let mut f = std::fs::File::create(&mem).unwrap();
        f.set_len(0x0243_2000).unwrap();
        f.seek(SeekFrom::Start(0x0243_0070)).unwrap();
        f.write_all(&0x0000_0454u32.to_le_bytes()).unwrap();
        f.seek(SeekFrom::Start(0x0243_0068)).unwrap();
        f.write_all(&0x0000_0050u32.to_le_bytes()).unwrap();
        drop(f);
        assert_eq!(read_u32(&mem, 0x0243_0070).unwrap(), 0x454);
        assert_eq!(read_u32(&mem, 0x0243_0068).unwrap(), 0x50);
        assert_eq!(read_u32(&mem, 0x0243_0074).unwrap(), 0);
        assert!(read_u32(&mem, 0x0243_0071).is_err());
        assert!(read_u32(&dir.join("absent"), 0x1000).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
