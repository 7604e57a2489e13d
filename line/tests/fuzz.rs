//! Mutation fuzzing of every parser of the line that reads bytes from outside: the config
//! reader, the Modbus RTU decoder and PDU logic, the Modbus TCP framing and the serial command
//! parser. Deterministic (fixed seeds), bounded in count, run by plain `cargo test`. Each case
//! asserts an answer or an error — never a panic — and no single allocation beyond a bound
//! proportional to the input (a counting global allocator, on the fuzzing thread only).

use edge_ad_line::config::LineConfig;
use edge_ad_line::modbus::{handle_pdu, rtu_frame, RtuDecoder, RtuEvent};
use edge_ad_line::server::{mbap_pdu_len, tcp_response, SerialCommand, SerialParser};
use edge_ad_line::status::{LineState, Status};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only records sizes in const thread-locals.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f` on `input`, asserting no panic and no allocation over `bound`; returns its result.
fn checked<R>(what: &str, input: &[u8], bound: usize, f: impl FnOnce() -> R) -> R {
    LARGEST.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    TRACK.with(|t| t.set(false));
    let largest = LARGEST.with(|m| m.get());
    let r =
        r.unwrap_or_else(|_| panic!("{what}: panicked on {:?}", String::from_utf8_lossy(input)));
    assert!(
        largest <= bound,
        "{what}: allocated {largest} bytes at once for {} input bytes (bound {bound})",
        input.len()
    );
    r
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `v`: flips, overwrites, deletions, duplications, insertions of `tokens`.
fn mutate(rng: &mut Rng, v: &mut Vec<u8>, tokens: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0x00, 0xFF, b'"', b'[', b'=', b'\n', 0x80][rng.below(7)];
            }
            2 if !v.is_empty() => {
                let n = rng.below(16).min(v.len() - at.min(v.len()));
                v.drain(at.min(v.len())..at.min(v.len()) + n);
            }
            3 => {
                let t = tokens[rng.below(tokens.len())];
                v.splice(at..at, t.iter().copied());
            }
            4 if !v.is_empty() => {
                let s = rng.below(v.len());
                let e = (s + rng.below(32)).min(v.len());
                let piece = v[s..e].to_vec();
                v.splice(at..at, piece);
            }
            5 => v.truncate(at),
            _ => v.push(rng.next() as u8),
        }
    }
}

const CONFIGS: [&str; 3] = [
    include_str!("../../examples/line-demo.toml"),
    "[model]\nmodel = \"m.toml\"\nbank = \"b.eab\"\nthreads = 2\n[source]\nkind = \"v4l2\"\npath = \"/dev/video0\"\nformat = \"yuyv\"\nwidth = 640\nheight = 480\nfps = 30\ncontrols = { auto_exposure = 1, white_balance_automatic = false }\n[trigger]\nkind = \"gpio\"\n[gpio]\ntrigger = { chip = \"gpiochip0\", offset = 3 }\npass = 31\nstrobe_ms = 20\n[timing]\ndeadline_ms = 300\nfifo = 4\nfault_after = 3\n[modbus_rtu]\nport = \"/dev/ttyS1\"\nbaud = 19200\nunit_id = 7\nword_order = \"low_first\"\n[serial]\nport = \"/dev/ttyS2\"\n[log]\nresults = \"r.jsonl\"\nresults_max_mb = 10\nresults_keep = 3\n",
    "board = \"orin-nano\"\n[model]\nmodel = \"m\"\nbank = \"b\"\ndevice = \"cuda\"\n[source]\nkind = \"file\"\npath = \"p.png\"\n[trigger]\nkind = \"free_run\"\nrate_hz = 30.0\ncount = 100\n[modbus_tcp]\nbind = \"0.0.0.0:502\"\nmax_connections = 4\nidle_timeout_s = 30\n",
];

const CONFIG_TOKENS: [&[u8]; 16] = [
    b"= 0",
    b"= -1",
    b"= 1e309",
    b"= nan",
    b"= inf",
    b"= 18446744073709551615",
    b"= 100000000000",
    b"= 4294967296",
    b"[[model]]\n",
    b"[timing]\nfifo = 100000000000\n",
    b"= { }",
    b"= []",
    b"\"\\u{0}\"",
    b"'''",
    b"= 1979-05-27T07:32:00Z",
    b"\n[gpio]\ntrigger = 99999\n",
];

#[test]
fn config_reader_never_panics_on_mutated_configs() {
    let path = Path::new("/nonexistent/line.toml");
    let mut rng = Rng(0x5EED_C0F1);
    let (mut ok, mut err) = (0, 0);
    for case in 0..20_000 {
        let mut v = CONFIGS[case % CONFIGS.len()].as_bytes().to_vec();
        mutate(&mut rng, &mut v, &CONFIG_TOKENS);
        let bound = 64 * 1024 + 64 * v.len();
        match checked("config", &v, bound, || LineConfig::from_bytes(&v, path)) {
            Ok(c) => {
                ok += 1;
                // Whatever parsed is inside the documented ranges.
                assert!((1..=64).contains(&c.timing.fifo), "{}", c.timing.fifo);
                assert!(c.timing.fault_after >= 1);
            }
            Err(e) => {
                err += 1;
                assert!(e.to_string().starts_with("/nonexistent/line.toml: "), "{e}");
            }
        }
    }
    eprintln!("config: 20000 cases, {ok} accepted, {err} refused");
    assert!(ok > 500 && err > 5000, "{ok} {err}");
}

fn registers() -> edge_ad_line::status::Registers {
    Status {
        state: LineState::Running,
        ..Default::default()
    }
    .registers()
}

#[test]
fn modbus_rtu_decoder_and_pdu_logic_never_panic() {
    let regs = registers();
    let valid: Vec<Vec<u8>> = vec![
        rtu_frame(1, &[3, 0, 0, 0, 10]),
        rtu_frame(1, &[4, 0, 200, 0, 40]),
        rtu_frame(1, &[1, 0, 0, 0, 4]),
        rtu_frame(1, &[5, 0, 0, 0xFF, 0]),
        rtu_frame(1, &[6, 0, 100, 0, 1]),
        rtu_frame(1, &[15, 0, 0, 0, 4, 1, 0x0F]),
        rtu_frame(1, &[16, 0, 100, 0, 1, 2, 0, 3]),
    ];
    let tokens: Vec<&[u8]> = valid.iter().map(|v| v.as_slice()).collect();
    let mut rng = Rng(0xB0B5_1DE5);
    let mut requests = 0;
    for case in 0..20_000 {
        let mut stream: Vec<u8> = Vec::new();
        for _ in 0..1 + rng.below(6) {
            stream.extend_from_slice(&valid[rng.below(valid.len())]);
        }
        mutate(&mut rng, &mut stream, &tokens);
        let bound = 16 * 1024 + 4 * stream.len();
        let events = checked("rtu", &stream, bound, || {
            let mut d = RtuDecoder::default();
            let mut out = Vec::new();
            // Fed in random chunk sizes, as reads deliver them.
            let mut rest = &stream[..];
            let mut chunk = 1 + case % 17;
            while !rest.is_empty() {
                let n = chunk.min(rest.len());
                d.push(&rest[..n]);
                rest = &rest[n..];
                while let Some(e) = d.next_event() {
                    if let RtuEvent::Request(_, pdu) = &e {
                        let resp = handle_pdu(pdu, &regs, |_| Ok(()));
                        assert!(!resp.is_empty() && resp.len() <= 253, "{resp:?}");
                    }
                    out.push(e);
                }
                chunk = 1 + (chunk * 7) % 23;
            }
            out
        });
        requests += events
            .iter()
            .filter(|e| matches!(e, RtuEvent::Request(..)))
            .count();
    }
    eprintln!("rtu: 20000 streams, {requests} requests decoded");
    assert!(requests > 20_000, "{requests}");
}

#[test]
fn modbus_tcp_framing_never_panics() {
    let st = Status::default();
    let mut rng = Rng(0x7C9_0000_0001);
    let req = |tid: u16, pdu: &[u8]| {
        let mut v = tid.to_be_bytes().to_vec();
        v.extend([0, 0]);
        v.extend(((pdu.len() + 1) as u16).to_be_bytes());
        v.push(1);
        v.extend_from_slice(pdu);
        v
    };
    let valid = [
        req(1, &[3, 0, 0, 0, 125]),
        req(2, &[4, 0, 0, 0, 126]),
        req(3, &[16, 0, 100, 0, 1, 2, 0, 2]),
        req(4, &[15, 0, 0, 0, 9, 2, 0xFF, 1]),
        req(5, &[43, 14, 1, 0]),
    ];
    let tokens: Vec<&[u8]> = valid.iter().map(|v| v.as_slice()).collect();
    let mut answered = 0;
    for _ in 0..20_000 {
        let mut stream: Vec<u8> = Vec::new();
        for _ in 0..1 + rng.below(4) {
            stream.extend_from_slice(&valid[rng.below(valid.len())]);
        }
        mutate(&mut rng, &mut stream, &tokens);
        answered += checked("tcp", &stream, 4096, || {
            // The connection loop over a byte stream: header, body, answer; an error closes.
            let mut n = 0;
            let mut rest = &stream[..];
            while rest.len() >= 7 {
                let mbap: [u8; 7] = rest[..7].try_into().unwrap();
                let Ok(len) = mbap_pdu_len(&mbap) else { break };
                if rest.len() < 7 + len {
                    break;
                }
                if let Some(out) = tcp_response(&mbap, &rest[7..7 + len], 1, &st, |_| Ok(())) {
                    assert!(out.len() <= 7 + 253, "{}", out.len());
                    n += 1;
                }
                rest = &rest[7 + len..];
            }
            n
        });
    }
    eprintln!("tcp: 20000 streams, {answered} requests answered");
    assert!(answered > 20_000, "{answered}");
}

#[test]
fn serial_parser_never_panics_and_holds_at_most_a_line() {
    let mut rng = Rng(0x5E41_A100);
    let tokens: [&[u8]; 6] = [
        b"TRIG\r\n",
        b"PING\n",
        b"STATUS?\r",
        b"RESET\r\n",
        b"\r\n",
        &[b'X'; 80],
    ];
    let mut commands = 0;
    for _ in 0..20_000 {
        let mut v: Vec<u8> = Vec::new();
        for _ in 0..1 + rng.below(5) {
            v.extend_from_slice(tokens[rng.below(tokens.len())]);
        }
        mutate(&mut rng, &mut v, &tokens);
        let cmds = checked("serial", &v, 1024, || {
            let mut p = SerialParser::default();
            let mut out = Vec::new();
            for &b in &v {
                if let Some(c) = p.push(b) {
                    out.push(c);
                }
            }
            out
        });
        // A line of over 64 bytes before a terminator is always reported as too long.
        commands += cmds
            .iter()
            .filter(|c| **c != SerialCommand::Unknown)
            .count();
    }
    eprintln!("serial: 20000 inputs, {commands} known commands");
    assert!(commands > 12_000, "{commands}");
}

/// The harness itself: an allocation over the bound and a panic are both caught.
#[test]
#[should_panic(expected = "allocated")]
fn the_allocation_bound_is_enforced() {
    checked("probe", b"", 100, || {
        std::hint::black_box(vec![0u8; 4096]).len()
    });
}

#[test]
#[should_panic(expected = "panicked on")]
fn a_parser_panic_is_reported() {
    checked("probe", b"x", 1 << 20, || {
        if std::hint::black_box(true) {
            panic!("boom")
        }
    });
}
