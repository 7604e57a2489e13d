//! edge-ad boards: board profiles, detection from the device tree, and the 40-pin header tables
//! that turn a header pin into (GPIO chip label, line offset).
//!
//! Facts (compatible strings, pin → controller line tables) are NVIDIA's, from the Jetson.GPIO
//! library (`lib/python/Jetson/GPIO/gpio_pin_data.py`, GitHub NVIDIA/jetson-gpio), as collected in
//! the project's line-side reference §3.2 and §3.4. Chips are addressed by label, never by number:
//! the numbering has changed between releases.

use serde::Deserialize;

pub mod pinmux;

/// A board profile (`boards/profiles/<name>.toml`, built into the binary).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name used in configs and `EDGE_AD_BOARD`.
    pub name: String,
    /// Human name.
    pub title: String,
    /// SoC family (`tegra234`, `tegra194`, `x86_64`, `any`).
    pub soc: String,
    /// Label of the main GPIO controller.
    #[serde(default)]
    pub gpio_chip: Option<String>,
    /// Label of the always-on GPIO controller.
    #[serde(default)]
    pub gpio_chip_aon: Option<String>,
    /// `/proc/device-tree/compatible` entries that identify the board.
    pub compatible: Vec<String>,
    /// Whether a CUDA GPU is expected.
    pub cuda: bool,
    /// Default header pins of the line I/O.
    #[serde(default)]
    pub pins: Option<DefaultPins>,
}

/// Default line I/O pins (40-pin header numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultPins {
    /// Trigger input (photo-eye through an opto, active low).
    pub trigger_in: u8,
    /// PASS output (energised for OK).
    pub pass_out: u8,
    /// STROBE output (result valid).
    pub strobe_out: u8,
    /// READY output.
    pub ready_out: u8,
    /// HEARTBEAT output.
    pub heartbeat_out: u8,
}

const PROFILES: [(&str, &str); 7] = [
    ("orin-nano", include_str!("../profiles/orin-nano.toml")),
    ("orin-nx", include_str!("../profiles/orin-nx.toml")),
    ("agx-orin", include_str!("../profiles/agx-orin.toml")),
    ("xavier-nx", include_str!("../profiles/xavier-nx.toml")),
    ("agx-xavier", include_str!("../profiles/agx-xavier.toml")),
    ("x86-nvidia", include_str!("../profiles/x86-nvidia.toml")),
    ("cpu-only", include_str!("../profiles/cpu-only.toml")),
];

/// Errors of choosing a board.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BoardError {
    /// No profile has this name.
    #[error("unknown board profile `{0}`: expected one of {1}")]
    Unknown(String, String),
    /// The configured profile does not match the device tree.
    #[error("board profile `{profile}` expects one of [{expected}] in /proc/device-tree/compatible, which says [{found}]")]
    Mismatch {
        /// The configured profile.
        profile: String,
        /// Its compatible strings.
        expected: String,
        /// What the device tree says.
        found: String,
    },
    /// A header pin that is not a GPIO on this board.
    #[error("header pin {pin} is not a GPIO of the 40-pin header on {board} (usable: {usable})")]
    NotGpio {
        /// The pin asked for.
        pin: u8,
        /// The board.
        board: String,
        /// Pins that are.
        usable: String,
    },
}

/// Every built-in profile.
pub fn profiles() -> Vec<Profile> {
    PROFILES
        .iter()
        .map(|(n, t)| {
            toml::from_str(t).unwrap_or_else(|e| panic!("built-in profile {n} is invalid: {e}"))
        })
        .collect()
}

/// The profile called `name`.
pub fn profile(name: &str) -> Result<Profile, BoardError> {
    profiles()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            BoardError::Unknown(
                name.into(),
                PROFILES.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
            )
        })
}

/// Split `/proc/device-tree/compatible` (NUL-separated).
pub fn compatible_entries(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The Jetson profile whose compatible strings match an entry of the device tree, if any.
pub fn detect(compatible: &[u8]) -> Option<Profile> {
    let entries = compatible_entries(compatible);
    profiles()
        .into_iter()
        .find(|p| p.compatible.iter().any(|c| entries.contains(c)))
}

/// Check that `profile` fits the device tree (profiles without compatible strings fit anything).
pub fn check(profile: &Profile, compatible: &[u8]) -> Result<(), BoardError> {
    let entries = compatible_entries(compatible);
    if profile.compatible.is_empty() || profile.compatible.iter().any(|c| entries.contains(c)) {
        return Ok(());
    }
    Err(BoardError::Mismatch {
        profile: profile.name.clone(),
        expected: profile.compatible.join(", "),
        found: entries.join(", "),
    })
}

/// A header pin's GPIO line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinLine {
    /// On the always-on controller (`…-gpio-aon`) instead of the main one.
    pub aon: bool,
    /// Line offset within that chip.
    pub offset: u32,
    /// Tegra port name, e.g. `PQ.06`.
    pub port: &'static str,
}

/// One board's entry for a pin: (on the `-aon` controller, line offset, port).
type Line = (bool, u32, &'static str);

/// Header pin → (controller, offset, port) for Orin Nano/NX, AGX Orin, Xavier NX, AGX Xavier
/// (Jetson.GPIO; `false` = main controller, `true` = `-aon`).
#[rustfmt::skip]
const PIN_TABLE: [(u8, [Line; 4]); 22] = [
    (7,  [(false, 144, "PAC.06"), (false, 106, "PQ.06"), (false, 118, "PS.04"), (false, 106, "PQ.06")]),
    (11, [(false, 112, "PR.04"), (false, 112, "PR.04"), (false, 112, "PR.04"), (false, 112, "PR.04")]),
    (12, [(false, 50, "PH.07"), (false, 50, "PH.07"), (false, 127, "PT.05"), (false, 51, "PH.07")]),
    (13, [(false, 122, "PY.00"), (false, 108, "PR.00"), (false, 149, "PY.00"), (false, 108, "PR.00")]),
    (15, [(false, 85, "PN.01"), (false, 85, "PN.01"), (true, 16, "PCC.04"), (false, 84, "PN.01")]),
    (16, [(false, 126, "PY.04"), (true, 9, "PBB.01"), (false, 153, "PY.04"), (true, 8, "PBB.00")]),
    (18, [(false, 125, "PY.03"), (false, 43, "PH.00"), (false, 152, "PY.03"), (false, 44, "PH.00")]),
    (19, [(false, 135, "PZ.05"), (false, 135, "PZ.05"), (false, 162, "PZ.05"), (false, 162, "PZ.05")]),
    (21, [(false, 134, "PZ.04"), (false, 134, "PZ.04"), (false, 161, "PZ.04"), (false, 161, "PZ.04")]),
    (22, [(false, 123, "PY.01"), (false, 96, "PP.04"), (false, 150, "PY.01"), (false, 101, "PQ.01")]),
    (23, [(false, 133, "PZ.03"), (false, 133, "PZ.03"), (false, 160, "PZ.03"), (false, 160, "PZ.03")]),
    (24, [(false, 136, "PZ.06"), (false, 136, "PZ.06"), (false, 163, "PZ.06"), (false, 163, "PZ.06")]),
    (26, [(false, 137, "PZ.07"), (false, 137, "PZ.07"), (false, 164, "PZ.07"), (false, 164, "PZ.07")]),
    (29, [(false, 105, "PQ.05"), (true, 1, "PAA.01"), (false, 105, "PQ.05"), (true, 3, "PAA.03")]),
    (31, [(false, 106, "PQ.06"), (true, 0, "PAA.00"), (false, 106, "PQ.06"), (true, 2, "PAA.02")]),
    (32, [(false, 41, "PG.06"), (true, 8, "PBB.00"), (false, 108, "PR.00"), (true, 9, "PBB.01")]),
    (33, [(false, 43, "PH.00"), (true, 2, "PAA.02"), (false, 84, "PN.01"), (true, 0, "PAA.00")]),
    (35, [(false, 53, "PI.02"), (false, 53, "PI.02"), (false, 130, "PU.00"), (false, 54, "PI.02")]),
    (36, [(false, 113, "PR.05"), (false, 113, "PR.05"), (false, 113, "PR.05"), (false, 113, "PR.05")]),
    (37, [(false, 124, "PY.02"), (true, 3, "PAA.03"), (false, 151, "PY.02"), (true, 1, "PAA.01")]),
    (38, [(false, 52, "PI.01"), (false, 52, "PI.01"), (false, 129, "PT.07"), (false, 53, "PI.01")]),
    (40, [(false, 51, "PI.00"), (false, 51, "PI.00"), (false, 128, "PT.06"), (false, 52, "PI.00")]),
];

fn column(board: &str) -> Option<usize> {
    match board {
        "orin-nano" | "orin-nx" => Some(0),
        "agx-orin" => Some(1),
        "xavier-nx" => Some(2),
        "agx-xavier" => Some(3),
        _ => None,
    }
}

/// The GPIO line of header `pin` on `profile`, with the chip label to open.
pub fn header_pin(profile: &Profile, pin: u8) -> Result<(String, PinLine), BoardError> {
    let not_gpio = || BoardError::NotGpio {
        pin,
        board: profile.title.clone(),
        usable: match column(&profile.name) {
            Some(_) => PIN_TABLE
                .iter()
                .map(|p| p.0.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            None => "none: this board has no 40-pin header; give { chip_label, offset }".into(),
        },
    };
    let col = column(&profile.name).ok_or_else(not_gpio)?;
    let (_, row) = PIN_TABLE.iter().find(|p| p.0 == pin).ok_or_else(not_gpio)?;
    let (aon, offset, port) = row[col];
    let chip = if aon {
        profile.gpio_chip_aon.clone()
    } else {
        profile.gpio_chip.clone()
    }
    .ok_or_else(not_gpio)?;
    Ok((chip, PinLine { aon, offset, port }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_and_names_match_files() {
        let ps = profiles();
        assert_eq!(ps.len(), 7);
        for (p, (n, _)) in ps.iter().zip(PROFILES) {
            assert_eq!(p.name, n);
        }
        assert!(profile("orin-nano").unwrap().cuda);
        let e = profile("pi5").unwrap_err().to_string();
        assert!(e.contains("pi5") && e.contains("agx-orin"), "{e}");
    }

    #[test]
    fn detection_from_the_device_tree() {
        let dt = b"nvidia,p3768-0000+p3767-0005-super\0nvidia,p3767-0005\0nvidia,tegra234\0";
        assert_eq!(detect(dt).unwrap().name, "orin-nano");
        assert_eq!(
            detect(b"nvidia,p3737-0000+p3701-0005\0nvidia,tegra234\0")
                .unwrap()
                .name,
            "agx-orin"
        );
        assert_eq!(
            detect(b"nvidia,p2972-0000\0nvidia,tegra194\0")
                .unwrap()
                .name,
            "agx-xavier"
        );
        assert_eq!(
            detect(b"nvidia,p3509-0000+p3668-0001\0").unwrap().name,
            "xavier-nx"
        );
        // SoC alone identifies no carrier: no profile (explicit chip/offset config needed).
        assert!(detect(b"nvidia,tegra234\0").is_none());
        let e = check(&profile("agx-orin").unwrap(), dt)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agx-orin") && e.contains("p3767-0005-super"),
            "{e}"
        );
        assert!(check(&profile("cpu-only").unwrap(), dt).is_ok());
    }

    /// Rows of the line-side reference's table (Jetson.GPIO), spot-checked per board.
    #[test]
    fn header_pins_map_to_documented_lines() {
        let nano = profile("orin-nano").unwrap();
        assert_eq!(
            header_pin(&nano, 7).unwrap(),
            (
                "tegra234-gpio".into(),
                PinLine {
                    aon: false,
                    offset: 144,
                    port: "PAC.06"
                }
            )
        );
        assert_eq!(header_pin(&nano, 29).unwrap().1.offset, 105);
        let agx = profile("agx-orin").unwrap();
        assert_eq!(
            header_pin(&agx, 16).unwrap(),
            (
                "tegra234-gpio-aon".into(),
                PinLine {
                    aon: true,
                    offset: 9,
                    port: "PBB.01"
                }
            )
        );
        let xnx = profile("xavier-nx").unwrap();
        assert_eq!(
            header_pin(&xnx, 15).unwrap(),
            (
                "tegra194-gpio-aon".into(),
                PinLine {
                    aon: true,
                    offset: 16,
                    port: "PCC.04"
                }
            )
        );
        let xagx = profile("agx-xavier").unwrap();
        assert_eq!(
            header_pin(&xagx, 12).unwrap().1,
            PinLine {
                aon: false,
                offset: 51,
                port: "PH.07"
            }
        );
        assert_eq!(
            header_pin(&xagx, 33).unwrap().1,
            PinLine {
                aon: true,
                offset: 0,
                port: "PAA.00"
            }
        );
        // Power and I²C pins are not GPIOs; boards without a header have none.
        let e = header_pin(&nano, 3).unwrap_err().to_string();
        assert!(e.contains("header pin 3") && e.contains("29"), "{e}");
        assert!(header_pin(&profile("x86-nvidia").unwrap(), 7).is_err());
        // Default pins of every Jetson profile exist on its header.
        for p in profiles().iter().filter(|p| p.pins.is_some()) {
            let d = p.pins.unwrap();
            for pin in [
                d.trigger_in,
                d.pass_out,
                d.strobe_out,
                d.ready_out,
                d.heartbeat_out,
            ] {
                header_pin(p, pin).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            }
        }
    }
}
