//! The fail-safe core (line-side.md §1.3, §6): tags, the bounded FIFO of parts in flight, one
//! resolution per tag (verdict or deadline, whichever comes first), outputs strictly in tag order,
//! and the state machine that decides whether a trigger is inspected at all.
//!
//! One thread (the arbiter) owns the FIFO and the [`Status`]; triggers, verdicts and commands reach
//! it as [`Event`]s, so "resolved exactly once" needs no locking: a verdict for a tag that is no
//! longer in the FIFO (its deadline won) is counted as late and dropped.

use super::config::SelectKind;
use super::status::{code, Counters, ErrCause, Health, LineState, Outcome, ResultRecord, Status};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the inspection stage says about a part: `(score, ng, product index)` (the product it was
/// inspected as: the one asked for, or the one recognised), or why there is no verdict.
pub type StageResult = Result<(f32, bool, usize), ErrCause>;

/// The inspection stage: frame + model for one tag. `Ok((score, ng))`, or why there is no verdict.
pub trait Stage: Send {
    /// Inspect the part of `tag` as product `product` (an index in [`Status::products`]: the
    /// product in effect at the part's trigger, whatever was selected since), or, with `None`
    /// (`select = "auto"`), as the product the stage recognises in the frame.
    fn inspect(&mut self, tag: u32, product: Option<usize>) -> StageResult;
    /// The self-test (line-side.md §6.2): a frame of the source scored by the model to a finite
    /// number, through the same path as a part, with the active product. `Err` carries the
    /// ERROR_CODE. Run at start and after every FAULT_ACK, so a line never returns to Running
    /// on trust.
    fn self_test(&mut self, product: usize) -> Result<(), u16> {
        self_test_outcome(self.inspect(0, Some(product)))
    }
}

/// Reads the product code at a trigger (`products.select = "gpio"`): the code is a product id.
pub type ProductInput = Box<dyn FnMut() -> std::io::Result<u16> + Send>;

/// Why a product change was refused; each maps to a Modbus exception and a serial reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductRefusal {
    /// No configured product has this id (Modbus exception 03).
    Unknown(u16),
    /// The line is Faulted or draining (exception 04): a change-over waits for a line that
    /// inspects.
    NotNow(LineState),
    /// Products are selected another way (`products.select`; exception 02).
    OtherSelect(SelectKind),
    /// The arbiter did not answer within a second (exception 04).
    Busy,
}

impl ProductRefusal {
    /// The Modbus exception code.
    pub fn exception(self) -> u8 {
        use super::modbus::{DEVICE_FAILURE, ILLEGAL_ADDRESS, ILLEGAL_VALUE};
        match self {
            ProductRefusal::Unknown(_) => ILLEGAL_VALUE,
            ProductRefusal::NotNow(_) | ProductRefusal::Busy => DEVICE_FAILURE,
            ProductRefusal::OtherSelect(_) => ILLEGAL_ADDRESS,
        }
    }
    /// The reason word of the serial reply `!ERR,<reason>`.
    pub fn word(self) -> &'static str {
        match self {
            ProductRefusal::Unknown(_) => "UNKNOWN_PRODUCT",
            ProductRefusal::NotNow(LineState::Draining) => "DRAINING",
            ProductRefusal::NotNow(_) => "FAULTED",
            ProductRefusal::OtherSelect(SelectKind::Modbus) => "SELECT_IS_MODBUS",
            ProductRefusal::OtherSelect(SelectKind::Serial) => "SELECT_IS_SERIAL",
            ProductRefusal::OtherSelect(SelectKind::Gpio) => "SELECT_IS_GPIO",
            ProductRefusal::OtherSelect(SelectKind::Auto) => "SELECT_IS_AUTO",
            ProductRefusal::Busy => "BUSY",
        }
    }
}

impl std::fmt::Display for ProductRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProductRefusal::Unknown(id) => write!(f, "product {id} is not configured"),
            ProductRefusal::NotNow(s) => write!(f, "the line is {s:?}"),
            ProductRefusal::OtherSelect(k) => {
                write!(f, "products are selected by {} (products.select)", k.word())
            }
            ProductRefusal::Busy => write!(f, "the line did not answer in time"),
        }
    }
}

/// A self-test frame's result as the self-test's: a finite score passes; a capture error is
/// 0x0203, anything else (inference, a non-finite score) 0x0402.
pub fn self_test_outcome(r: StageResult) -> Result<(), u16> {
    match r {
        Ok((score, _, _)) if score.is_finite() => Ok(()),
        Ok((score, _, _)) => {
            log::error!("self-test: score {score} is not finite");
            Err(code::SELF_TEST)
        }
        Err(ErrCause::Capture) => Err(ErrCause::Capture as u16),
        Err(_) => Err(code::SELF_TEST),
    }
}

/// Work for the stage's thread.
#[derive(Debug, Clone, Copy)]
enum Job {
    Inspect(u32, Option<usize>),
    SelfTest(usize),
}

/// Receives every resolved tag, in tag order, and state changes.
pub trait Sink: Send {
    /// A resolved tag.
    fn emit(&mut self, r: &ResultRecord);
    /// The state changed (READY and similar outputs follow it).
    fn state(&mut self, _state: LineState) {}
}

/// Operator commands (Modbus coils / COMMAND register, serial).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Zero the counters.
    ClearCounters,
    /// Acknowledge a fault: Faulted → Ready (or Running with auto_online), clear the overrun latch.
    FaultAck,
    /// Go online (Running) or offline (Ready).
    Online(bool),
}

/// Messages to the arbiter.
#[derive(Debug)]
pub enum Event {
    /// A trigger at this time.
    Trigger(Instant),
    /// The stage's answer for a tag.
    Verdict(u32, StageResult),
    /// An operator command.
    Command(Command),
    /// Self-test finished: Ready (and Running with auto_online), or Faulted with an error code.
    SelfTest(Result<(), u16>),
    /// Run the self-test on the stage now (at start, once the I/O is open).
    RequestSelfTest,
    /// A port the line reports on is gone (`Some(code)`: 0x0501 missing at start, 0x0502
    /// vanished while running) or is back (`None`).
    PortLost(Option<u16>),
    /// An I/O fault found at start (GPIO, pinmux, a port that could not be opened): Faulted
    /// with this code until the process is restarted.
    IoFault(u16),
    /// Make product `id` the active one, asked by `origin`; the answer goes back on the channel.
    /// Past the instant (the asker stopped waiting and answered BUSY) it is refused, not done.
    SelectProduct(
        u16,
        SelectKind,
        Instant,
        SyncSender<Result<(), ProductRefusal>>,
    ),
    /// SIGTERM: drain and stop.
    Shutdown,
}

/// Timing and capacity of the line.
#[derive(Debug, Clone, Copy)]
pub struct LineTiming {
    /// Trigger → verdict deadline.
    pub deadline: Duration,
    /// Parts in flight at most (FIFO capacity).
    pub fifo: usize,
    /// Go Running after the self-test without an ONLINE command.
    pub auto_online: bool,
    /// Consecutive ERR results of parts inspected while Running (deadline, overrun, capture,
    /// inference) that fault the line.
    pub fault_after: u32,
    /// How products are selected (`products.select`); `None`: one product, or any origin.
    pub select: Option<SelectKind>,
}

/// Cloneable handle: how triggers, commands and shutdown reach the arbiter.
#[derive(Debug, Clone)]
pub struct LineHandle {
    tx: Sender<Event>,
    status: Arc<Mutex<Status>>,
    health: Arc<Health>,
}

impl LineHandle {
    /// A trigger now.
    pub fn trigger(&self) {
        self.trigger_at(Instant::now());
    }
    /// A trigger that happened at `t0` (an input's kernel timestamp): its deadline counts from
    /// then, not from when the event was read.
    pub fn trigger_at(&self, t0: Instant) {
        let _ = self.tx.send(Event::Trigger(t0));
    }
    /// An operator command.
    pub fn command(&self, c: Command) {
        let _ = self.tx.send(Event::Command(c));
    }
    /// Report a self-test result made elsewhere (I/O that failed to open).
    pub fn self_test(&self, r: Result<(), u16>) {
        let _ = self.tx.send(Event::SelfTest(r));
    }
    /// An I/O fault found at start: Faulted until restarted (FAULT_ACK cannot clear it).
    pub fn io_fault(&self, code: u16) {
        let _ = self.tx.send(Event::IoFault(code));
    }
    /// Let the stage run the self-test; its result moves the line on.
    pub fn request_self_test(&self) {
        let _ = self.tx.send(Event::RequestSelfTest);
    }
    /// A port is gone with this code (`Some`) or was reopened (`None`). The port's bit in
    /// [`Health::ports_lost`] is set before and cleared before this is sent.
    pub fn port_lost(&self, code: Option<u16>) {
        let _ = self.tx.send(Event::PortLost(code));
    }
    /// Make product `id` active for every later trigger, asked by `origin` (Modbus PRODUCT_SELECT
    /// or the serial PRODUCT command). Returns once the arbiter has switched (parts already
    /// triggered keep their product) or refused.
    pub fn select_product(&self, id: u16, origin: SelectKind) -> Result<(), ProductRefusal> {
        let (tx, rx) = mpsc::sync_channel(1);
        let wait = Duration::from_secs(1);
        let until = Instant::now() + wait;
        if self
            .tx
            .send(Event::SelectProduct(id, origin, until, tx))
            .is_err()
        {
            return Err(ProductRefusal::NotNow(LineState::Draining));
        }
        rx.recv_timeout(wait).unwrap_or(Err(ProductRefusal::Busy))
    }
    /// Start draining.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }
    /// A copy of the current status, with the health figures of the other threads.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
            .with_health(&self.health)
    }
    /// The figures that sinks, servers and the stage update.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }
}

struct Entry {
    tag: u32,
    t0: Instant,
    /// The product id in effect at the trigger (0: none, an unknown GPIO code).
    product: u16,
    result: Option<(Outcome, f32, Option<ErrCause>)>,
}

/// Start the arbiter and the stage's worker thread. Returns the handle and the arbiter's join
/// handle (it ends after Shutdown once every tag in flight is resolved).
pub fn start(
    timing: LineTiming,
    stage: Box<dyn Stage>,
    sinks: Vec<Box<dyn Sink>>,
    status: Status,
) -> (LineHandle, std::thread::JoinHandle<Counters>) {
    start_with_health(timing, stage, sinks, status, Arc::default(), None)
}

/// [`start`] with the [`Health`] that sinks made before the line already count into, and the
/// product code input of `products.select = "gpio"`.
pub fn start_with_health(
    timing: LineTiming,
    stage: Box<dyn Stage>,
    sinks: Vec<Box<dyn Sink>>,
    status: Status,
    health: Arc<Health>,
    product_input: Option<ProductInput>,
) -> (LineHandle, std::thread::JoinHandle<Counters>) {
    let (tx, rx) = mpsc::channel();
    let status = Arc::new(Mutex::new(status));
    // One extra slot: a self-test after FAULT_ACK finds room even with the FIFO's parts queued.
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(timing.fifo.max(1) + 1);
    let worker_tx = tx.clone();
    let worker_health = health.clone();
    std::thread::Builder::new()
        .name("edge-ad-stage".into())
        .spawn(move || worker(stage, job_rx, worker_tx, &worker_health))
        .expect("spawn the stage thread");
    let handle = LineHandle {
        tx,
        status: status.clone(),
        health,
    };
    let arbiter_health = handle.health.clone();
    let join = std::thread::Builder::new()
        .name("edge-ad-arbiter".into())
        .spawn(move || {
            arbiter(
                timing,
                rx,
                job_tx,
                sinks,
                status,
                &arbiter_health,
                product_input,
            )
        })
        .expect("spawn the arbiter thread");
    (handle, join)
}

fn worker(mut stage: Box<dyn Stage>, jobs: Receiver<Job>, tx: Sender<Event>, health: &Health) {
    while let Ok(job) = jobs.recv() {
        if let Job::Inspect(tag, _) = job {
            // Resolved already (its deadline won while it waited): no frame spent on it, so a
            // self-test queued behind stale jobs runs at once.
            let through = health.resolved_through.load(Ordering::SeqCst);
            if (tag.wrapping_sub(through) as i32) <= 0 && through != 0 {
                continue;
            }
        }
        health.stage_busy.store(true, Ordering::SeqCst);
        // A panicking stage must not take the line down silently: its tag ends as ERR and the
        // next tags still run.
        let ev = match job {
            Job::Inspect(tag, product) => Event::Verdict(
                tag,
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    stage.inspect(tag, product)
                }))
                .unwrap_or(Err(ErrCause::Inference)),
            ),
            Job::SelfTest(product) => Event::SelfTest(
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.self_test(product)))
                    .unwrap_or(Err(code::SELF_TEST)),
            ),
        };
        health.stage_done.fetch_add(1, Ordering::SeqCst);
        health.stage_busy.store(false, Ordering::SeqCst);
        if tx.send(ev).is_err() {
            return;
        }
    }
}

fn ms_since(t0: Instant, now: Instant) -> u32 {
    now.saturating_duration_since(t0)
        .as_millis()
        .min(u32::MAX as u128) as u32
}

fn arbiter(
    timing: LineTiming,
    rx: Receiver<Event>,
    jobs: SyncSender<Job>,
    mut sinks: Vec<Box<dyn Sink>>,
    status: Arc<Mutex<Status>>,
    health: &Health,
    mut product_input: Option<ProductInput>,
) -> Counters {
    let start = Instant::now();
    let mut st = status.lock().map(|s| s.clone()).unwrap_or_default();
    let mut fifo: VecDeque<Entry> = VecDeque::new();
    let mut next_tag: u32 = 1;
    let mut consecutive_errors = 0u32;
    // An I/O fault found at start (a port, GPIO, pinmux that failed to open): FAULT_ACK cannot
    // clear it, only a restart with the fault mended (ports missing at start are reopened and
    // show as PORT_LOST instead).
    let mut io_fault: Option<u16> = None;
    let mut port_code = code::SERIAL_LOST;
    // Unresolved entries (tag, deadline) in tag order: at most `timing.fifo`, so deadlines and
    // verdicts cost O(1) in the number of resolved entries waiting behind the head (a trigger
    // flood while the head is inspected).
    let mut pending: VecDeque<(u32, Instant)> = VecDeque::new();
    let index_of = |fifo: &VecDeque<Entry>, tag: u32| {
        let front = fifo.front()?.tag;
        let i = tag.wrapping_sub(front) as usize;
        (i < fifo.len() && fifo[i].tag == tag).then_some(i)
    };
    let mut last_state = st.state;
    for s in sinks.iter_mut() {
        s.state(st.state);
    }
    loop {
        let now = Instant::now();
        // Wake at the head's deadline or the next heartbeat half-period.
        let hb_next =
            Duration::from_millis(500 * (now.duration_since(start).as_millis() as u64 / 500 + 1));
        let mut wake = start + hb_next;
        if let Some(&(_, deadline)) = pending.front() {
            wake = wake.min(deadline);
        }
        let ev = rx.recv_timeout(wake.saturating_duration_since(now));
        let now = Instant::now();
        match ev {
            Ok(Event::Trigger(t0)) => {
                let tag = next_tag;
                next_tag = if next_tag == u32::MAX {
                    1
                } else {
                    next_tag + 1
                };
                st.counters.triggers = st.counters.triggers.wrapping_add(1);
                let unresolved = pending.len();
                // The product in effect at this trigger: the selected one, or the code on the
                // product inputs now (gpio).
                let auto = timing.select == Some(SelectKind::Auto);
                let product = match product_input.as_mut().map(|read| read()) {
                    None => Ok(st.active),
                    Some(Ok(code)) => st.product_index(code).ok_or(ErrCause::UnknownProduct),
                    Some(Err(e)) => {
                        log::warn!("tag {tag}: product inputs: {e}");
                        Err(ErrCause::ProductInput)
                    }
                };
                // Auto: the stage says which product it recognised (0 until then).
                let product_id = match product {
                    Ok(i) if !auto => st.products[i].id,
                    _ => 0,
                };
                if let Ok(i) = product {
                    if product_input.is_some() && i != st.active {
                        log::info!(
                            "product {} ({}) active",
                            st.products[i].id,
                            st.products[i].name
                        );
                        st.active = i;
                    }
                }
                let result = if st.state != LineState::Running {
                    Some((Outcome::Err, f32::NAN, Some(ErrCause::NotRunning)))
                } else if let Err(cause) = product {
                    Some((Outcome::Err, f32::NAN, Some(cause)))
                } else if unresolved >= timing.fifo
                    || jobs
                        .try_send(Job::Inspect(
                            tag,
                            (!auto).then(|| product.unwrap_or(st.active)),
                        ))
                        .is_err()
                {
                    st.counters.overruns = st.counters.overruns.wrapping_add(1);
                    st.overrun_latched = true;
                    Some((Outcome::Err, f32::NAN, Some(ErrCause::Overrun)))
                } else {
                    pending.push_back((tag, t0 + timing.deadline));
                    None
                };
                // Tags in the FIFO are consecutive: a restart at 1 after u32::MAX empties it
                // first (at 30 parts/s that is 4.5 years; the FIFO is never that old).
                fifo.push_back(Entry {
                    tag,
                    t0,
                    product: product_id,
                    result,
                });
            }
            Ok(Event::Verdict(tag, r)) => {
                let slot = index_of(&fifo, tag).filter(|&i| fifo[i].result.is_none());
                match slot.map(|i| &mut fifo[i]) {
                    Some(e) => {
                        pending.retain(|&(t, _)| t != tag);
                        if let Ok((_, _, i)) = r {
                            if let Some(p) = st.products.get(i) {
                                e.product = p.id;
                                // Auto: the product last recognised is the active one.
                                if timing.select == Some(SelectKind::Auto) {
                                    st.active = i;
                                }
                            }
                        }
                        e.result = Some(match r {
                            Ok((score, ng, _)) if score.is_finite() => {
                                (if ng { Outcome::Ng } else { Outcome::Ok }, score, None)
                            }
                            Ok((score, _, _)) => (Outcome::Err, score, Some(ErrCause::Inference)),
                            Err(cause) => (Outcome::Err, f32::NAN, Some(cause)),
                        });
                    }
                    None => st.counters.late_results = st.counters.late_results.wrapping_add(1),
                }
            }
            Ok(Event::Command(c)) => match c {
                Command::ClearCounters => {
                    st.counters = Counters::default();
                }
                Command::FaultAck => {
                    st.overrun_latched = false;
                    // Back to Ready/Running only through a new self-test, not while a port is
                    // still gone (read from the ports' own bits: no event race), and never over
                    // an I/O fault found at start.
                    let ports_lost = health.ports_lost.load(Ordering::SeqCst) != 0;
                    if st.state == LineState::Faulted && (ports_lost || io_fault.is_some()) {
                        log::warn!(
                            "FAULT_ACK refused: {}",
                            if ports_lost {
                                "a serial port is still gone"
                            } else {
                                "an I/O fault found at start needs a restart"
                            }
                        );
                    } else if st.state == LineState::Faulted {
                        consecutive_errors = 0;
                        if jobs.try_send(Job::SelfTest(st.active)).is_ok() {
                            st.state = LineState::SelfTest;
                        } else {
                            log::warn!(
                                "FAULT_ACK: the stage is still busy; the line stays Faulted"
                            );
                        }
                    }
                }
                Command::Online(on) => {
                    if matches!(st.state, LineState::Ready | LineState::Running) {
                        if on && st.state == LineState::Ready {
                            consecutive_errors = 0;
                        }
                        st.state = if on {
                            LineState::Running
                        } else {
                            LineState::Ready
                        };
                    }
                }
            },
            Ok(Event::RequestSelfTest) => {
                if matches!(st.state, LineState::Booting | LineState::SelfTest) {
                    st.state = LineState::SelfTest;
                    if jobs.try_send(Job::SelfTest(st.active)).is_err() {
                        st.state = LineState::Faulted;
                        st.error_code = code::SELF_TEST;
                    }
                }
            }
            Ok(Event::PortLost(lost)) => {
                if let Some(c) = lost {
                    port_code = c;
                    if st.state != LineState::Draining {
                        // A fault already on the register keeps its code.
                        if st.state != LineState::Faulted {
                            st.error_code = c;
                        }
                        st.state = LineState::Faulted;
                    }
                }
            }
            Ok(Event::IoFault(c)) => {
                io_fault = Some(c);
                if st.state != LineState::Draining {
                    log::error!("self-test failed: error 0x{c:04x}; the line stays Faulted (READY low, every part rejected) until restarted");
                    st.error_code = c;
                    st.state = LineState::Faulted;
                }
            }
            Ok(Event::SelfTest(r)) => {
                if !matches!(st.state, LineState::Booting | LineState::SelfTest) {
                    // Late (a state change overtook it): ignored; Draining is never left.
                } else if health.ports_lost.load(Ordering::SeqCst) != 0 || io_fault.is_some() {
                    st.state = LineState::Faulted;
                    st.error_code = io_fault.unwrap_or(port_code);
                } else {
                    match r {
                        Ok(()) => {
                            consecutive_errors = 0;
                            st.error_code = 0;
                            st.state = if timing.auto_online {
                                LineState::Running
                            } else {
                                LineState::Ready
                            };
                        }
                        Err(code) => {
                            log::error!("self-test failed: error 0x{code:04x}; the line stays Faulted (READY low, every part rejected)");
                            st.error_code = code;
                            st.state = LineState::Faulted;
                        }
                    }
                }
            }
            Ok(Event::SelectProduct(id, origin, until, reply)) => {
                let r = if now > until {
                    Err(ProductRefusal::Busy)
                } else if timing.select.is_some_and(|k| k != origin) {
                    Err(ProductRefusal::OtherSelect(timing.select.unwrap_or(origin)))
                } else if matches!(st.state, LineState::Faulted | LineState::Draining) {
                    Err(ProductRefusal::NotNow(st.state))
                } else {
                    st.product_index(id).ok_or(ProductRefusal::Unknown(id))
                };
                match r {
                    Ok(i) => {
                        if i != st.active {
                            log::info!(
                                "product {} ({}) active from tag {} on (was {})",
                                id,
                                st.products[i].name,
                                next_tag,
                                st.active_product().id
                            );
                        }
                        st.active = i;
                        // Published before the answer: a master that reads right after its
                        // write sees the new product.
                        if let Ok(mut shared) = status.lock() {
                            shared.active = i;
                        }
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        log::warn!("product {id} refused ({}): {e}", origin.word());
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Ok(Event::Shutdown) => st.state = LineState::Draining,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => st.state = LineState::Draining,
        }
        // Deadlines: any unresolved entry past its deadline is ERR (line-side.md §6.3).
        while let Some(&(tag, deadline)) = pending.front() {
            if now < deadline {
                break;
            }
            pending.pop_front();
            if let Some(i) = index_of(&fifo, tag) {
                fifo[i].result = Some((Outcome::Err, f32::NAN, Some(ErrCause::Deadline)));
            }
        }
        // Emit from the head, in tag order.
        while fifo.front().is_some_and(|e| e.result.is_some()) {
            let e = fifo.pop_front().expect("front exists");
            // The stage skips jobs of tags already resolved (their deadline won).
            health.resolved_through.store(e.tag, Ordering::SeqCst);
            let (outcome, score, cause) = e.result.expect("resolved");
            let rec = ResultRecord {
                tag: e.tag,
                outcome,
                score,
                ms: ms_since(e.t0, now),
                cause,
                product: e.product,
            };
            st.record(&rec);
            // Sustained ERR (line-side.md §6.1): `fault_after` parts in a row that were to be
            // inspected and got no verdict fault the line, whatever the cause.
            match (outcome, cause) {
                (Outcome::Err, Some(ErrCause::NotRunning)) => {}
                (Outcome::Err, c) => {
                    consecutive_errors += 1;
                    if consecutive_errors >= timing.fault_after && st.state == LineState::Running {
                        st.state = LineState::Faulted;
                        st.error_code = c.unwrap_or(ErrCause::Inference) as u16;
                        log::error!(
                            "{consecutive_errors} parts in a row without a verdict (last: {:?}): line Faulted",
                            c
                        );
                    }
                }
                _ => consecutive_errors = 0,
            }
            for s in sinks.iter_mut() {
                s.emit(&rec);
            }
        }
        let up = now.duration_since(start);
        st.heartbeat = (up.as_millis() / 500) % 2 == 1;
        st.heartbeat_count = (up.as_secs() % 65536) as u16;
        st.uptime_s = up.as_secs() as u32;
        st.in_flight = fifo.len().min(u16::MAX as usize) as u16;
        st.alive = st.alive.wrapping_add(1);
        if st.state != last_state {
            log::info!("line state {:?} → {:?}", last_state, st.state);
            for s in sinks.iter_mut() {
                s.state(st.state);
            }
            last_state = st.state;
        }
        if let Ok(mut shared) = status.lock() {
            *shared = st.clone();
        }
        if st.state == LineState::Draining && fifo.is_empty() {
            return st.counters;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores tag n as n/100, NG when the tag is a multiple of 5; stalls or fails on request.
    struct Fake {
        delay: Duration,
        stall_tags: Vec<u32>,
        fail_tags: Vec<u32>,
    }
    impl Stage for Fake {
        fn inspect(&mut self, tag: u32, _product: Option<usize>) -> StageResult {
            if self.stall_tags.contains(&tag) {
                std::thread::sleep(Duration::from_millis(600));
            }
            std::thread::sleep(self.delay);
            if self.fail_tags.contains(&tag) {
                return Err(ErrCause::Capture);
            }
            Ok((tag as f32 / 100.0, tag.is_multiple_of(5), 0))
        }
    }

    struct Collect(Arc<Mutex<Vec<ResultRecord>>>);
    impl Sink for Collect {
        fn emit(&mut self, r: &ResultRecord) {
            self.0.lock().unwrap().push(*r);
        }
    }

    fn run(
        fake: Fake,
        timing: LineTiming,
        triggers: u32,
        gap: Duration,
    ) -> (Vec<ResultRecord>, Counters) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (h, join) = start(
            timing,
            Box::new(fake),
            vec![Box::new(Collect(out.clone()))],
            Status::default(),
        );
        h.self_test(Ok(()));
        for _ in 0..triggers {
            h.trigger();
            std::thread::sleep(gap);
        }
        h.shutdown();
        let counters = join.join().unwrap();
        let v = out.lock().unwrap().clone();
        (v, counters)
    }

    const TIMING: LineTiming = LineTiming {
        deadline: Duration::from_millis(200),
        fifo: 4,
        auto_online: true,
        fault_after: 3,
        select: None,
    };

    #[test]
    fn every_tag_gets_exactly_one_result_in_order() {
        let fake = Fake {
            delay: Duration::from_millis(1),
            stall_tags: vec![],
            fail_tags: vec![],
        };
        let (v, c) = run(fake, TIMING, 50, Duration::from_millis(3));
        assert_eq!(
            v.iter().map(|r| r.tag).collect::<Vec<_>>(),
            (1..=50).collect::<Vec<_>>()
        );
        assert!(v.iter().all(|r| r.outcome != Outcome::Err), "{v:?}");
        assert_eq!(v.iter().filter(|r| r.outcome == Outcome::Ng).count(), 10);
        assert_eq!((c.triggers, c.ok, c.ng, c.faults), (50, 40, 10, 0));
    }

    #[test]
    fn a_stalled_stage_ends_as_err_at_the_deadline() {
        let fake = Fake {
            delay: Duration::ZERO,
            stall_tags: vec![2],
            fail_tags: vec![],
        };
        let (v, c) = run(fake, TIMING, 3, Duration::from_millis(5));
        assert_eq!(v.iter().map(|r| r.tag).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(v[0].outcome, Outcome::Ok);
        // Tag 2 stalls 600 ms > 200 ms deadline; tag 3 waits behind it in the stage and misses too.
        assert_eq!(v[1].outcome, Outcome::Err);
        assert_eq!(v[1].cause, Some(ErrCause::Deadline));
        assert!(v[1].ms >= 200, "{}", v[1].ms);
        assert_eq!(v[2].cause, Some(ErrCause::Deadline));
        assert_eq!(c.triggers, c.ok + c.ng + c.faults);
        assert_eq!(c.faults, 2);
    }

    #[test]
    fn overrun_not_running_and_errors_reject_and_count() {
        // FIFO of 1 and a slow stage: back-to-back triggers overrun.
        let fake = Fake {
            delay: Duration::from_millis(50),
            stall_tags: vec![],
            fail_tags: vec![],
        };
        let t = LineTiming { fifo: 1, ..TIMING };
        let (v, c) = run(fake, t, 3, Duration::ZERO);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].outcome, Outcome::Ok);
        assert!(v[1..].iter().all(|r| r.cause == Some(ErrCause::Overrun)));
        assert_eq!((c.overruns, c.faults), (2, 2));

        // Three consecutive capture errors fault the line; later triggers are rejected at once.
        let fake = Fake {
            delay: Duration::ZERO,
            stall_tags: vec![],
            fail_tags: vec![1, 2, 3],
        };
        let (v, c) = run(fake, TIMING, 5, Duration::from_millis(20));
        assert_eq!(v.len(), 5);
        assert!(v[..3].iter().all(|r| r.cause == Some(ErrCause::Capture)));
        assert!(v[3..].iter().all(|r| r.cause == Some(ErrCause::NotRunning)));
        assert_eq!(c.faults, 5);
    }

    #[test]
    fn triggers_before_the_self_test_are_rejected() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            delay: Duration::ZERO,
            stall_tags: vec![],
            fail_tags: vec![],
        };
        let (h, join) = start(
            TIMING,
            Box::new(fake),
            vec![Box::new(Collect(out.clone()))],
            Status::default(),
        );
        h.trigger();
        std::thread::sleep(Duration::from_millis(20));
        h.self_test(Ok(()));
        h.trigger();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(h.status().state, LineState::Running);
        h.shutdown();
        join.join().unwrap();
        let v = out.lock().unwrap().clone();
        assert_eq!(v[0].cause, Some(ErrCause::NotRunning));
        assert_eq!(v[1].outcome, Outcome::Ok);
    }
}

#[cfg(test)]
mod product_tests {
    use super::*;
    use crate::status::ProductInfo;

    /// Records the product index of each inspected tag; slow, so parts are in flight while
    /// the product changes.
    struct Recording(Arc<Mutex<Vec<(u32, usize)>>>);
    impl Stage for Recording {
        fn inspect(&mut self, tag: u32, product: Option<usize>) -> StageResult {
            std::thread::sleep(Duration::from_millis(30));
            // None (auto): "recognises" tag parity.
            let p = product.unwrap_or(tag as usize % 2);
            self.0.lock().unwrap().push((tag, p));
            Ok((0.5, false, p))
        }
    }

    fn two_products() -> Status {
        Status {
            products: Arc::from(vec![
                ProductInfo {
                    id: 3,
                    name: "a".into(),
                    bank_crc: 0xAAAA,
                },
                ProductInfo {
                    id: 7,
                    name: "b".into(),
                    bank_crc: 0xBBBB,
                },
            ]),
            ..Default::default()
        }
    }

    const T: LineTiming = LineTiming {
        deadline: Duration::from_millis(2000),
        fifo: 8,
        auto_online: true,
        fault_after: 3,
        select: Some(SelectKind::Modbus),
    };

    /// A part keeps the product of its trigger although the product changes while it waits in
    /// the FIFO; unknown ids, the wrong origin and a Faulted line are refused and change nothing.
    #[test]
    fn parts_in_flight_keep_the_product_of_their_trigger() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let (h, join) = start(
            T,
            Box::new(Recording(seen.clone())),
            vec![Box::new(Collect(out.clone()))],
            two_products(),
        );
        h.self_test(Ok(()));
        std::thread::sleep(Duration::from_millis(20));
        h.trigger();
        h.trigger();
        assert_eq!(h.select_product(7, SelectKind::Modbus), Ok(()));
        h.trigger();
        assert_eq!(
            h.select_product(9, SelectKind::Modbus),
            Err(ProductRefusal::Unknown(9))
        );
        assert_eq!(
            h.select_product(3, SelectKind::Serial),
            Err(ProductRefusal::OtherSelect(SelectKind::Modbus))
        );
        let s = h.status();
        assert_eq!(s.active_product().id, 7);
        assert_eq!(s.registers().register(27, false), Some(0xBBBB));
        h.io_fault(code::GPIO);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            h.select_product(3, SelectKind::Modbus),
            Err(ProductRefusal::NotNow(LineState::Faulted))
        );
        assert_eq!(ProductRefusal::NotNow(LineState::Faulted).exception(), 4);
        assert_eq!(ProductRefusal::Unknown(9).exception(), 3);
        h.shutdown();
        join.join().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(1, 0), (2, 0), (3, 1)]);
        let v = out.lock().unwrap().clone();
        assert_eq!(
            v.iter().map(|r| (r.tag, r.product)).collect::<Vec<_>>(),
            vec![(1, 3), (2, 3), (3, 7)]
        );
    }

    /// GPIO select: the code read at each trigger picks the product; a code that is no
    /// product, or inputs that cannot be read, make that part ERR with its own cause.
    #[test]
    fn gpio_codes_pick_the_product_at_each_trigger() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let codes = Arc::new(Mutex::new(vec![Ok(7), Ok(5), Err(()), Ok(3)]));
        let c = codes.clone();
        let input: ProductInput = Box::new(move || {
            c.lock()
                .unwrap()
                .remove(0)
                .map_err(|_| std::io::Error::other("line gone"))
        });
        let (h, join) = start_with_health(
            LineTiming {
                select: Some(SelectKind::Gpio),
                ..T
            },
            Box::new(Recording(seen.clone())),
            vec![Box::new(Collect(out.clone()))],
            two_products(),
            Arc::default(),
            Some(input),
        );
        h.self_test(Ok(()));
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..4 {
            h.trigger();
            std::thread::sleep(Duration::from_millis(40));
        }
        h.shutdown();
        join.join().unwrap();
        let v = out.lock().unwrap().clone();
        let got: Vec<_> = v.iter().map(|r| (r.tag, r.product, r.cause)).collect();
        assert_eq!(
            got,
            vec![
                (1, 7, None),
                (2, 0, Some(ErrCause::UnknownProduct)),
                (3, 0, Some(ErrCause::ProductInput)),
                (4, 3, None),
            ]
        );
        assert_eq!(*seen.lock().unwrap(), vec![(1, 1), (4, 0)]);
    }

    /// Auto: the stage recognises the product; the result carries it, ACTIVE_PRODUCT follows
    /// the last recognised one, and selecting by Modbus is refused.
    #[test]
    fn auto_results_carry_the_recognised_product() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let (h, join) = start(
            LineTiming {
                select: Some(SelectKind::Auto),
                ..T
            },
            Box::new(Recording(seen.clone())),
            vec![Box::new(Collect(out.clone()))],
            two_products(),
        );
        h.self_test(Ok(()));
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..3 {
            h.trigger();
        }
        assert_eq!(
            h.select_product(3, SelectKind::Modbus),
            Err(ProductRefusal::OtherSelect(SelectKind::Auto))
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(h.status().active_product().id, 7);
        h.shutdown();
        join.join().unwrap();
        let v = out.lock().unwrap().clone();
        assert_eq!(
            v.iter().map(|r| (r.tag, r.product)).collect::<Vec<_>>(),
            vec![(1, 7), (2, 3), (3, 7)]
        );
    }

    struct Collect(Arc<Mutex<Vec<ResultRecord>>>);
    impl Sink for Collect {
        fn emit(&mut self, r: &ResultRecord) {
            self.0.lock().unwrap().push(*r);
        }
    }
}

#[cfg(test)]
mod fault_tests {
    use super::*;

    /// A stage whose parts take `delay` and whose self-test result is set by the test.
    struct Slow {
        delay: Duration,
        self_tests: Arc<Mutex<Vec<bool>>>,
        self_test_ok: Arc<Mutex<bool>>,
    }
    impl Stage for Slow {
        fn inspect(&mut self, _tag: u32, product: Option<usize>) -> StageResult {
            std::thread::sleep(self.delay);
            Ok((0.1, false, product.unwrap_or(0)))
        }
        fn self_test(&mut self, _product: usize) -> Result<(), u16> {
            let ok = *self.self_test_ok.lock().unwrap();
            self.self_tests.lock().unwrap().push(ok);
            if ok {
                Ok(())
            } else {
                Err(code::SELF_TEST)
            }
        }
    }

    fn wait_for(h: &LineHandle, f: impl Fn(&Status) -> bool) -> Status {
        let t = Instant::now();
        loop {
            let s = h.status();
            if f(&s) || t.elapsed() > Duration::from_secs(5) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// M1: every part missing its deadline used to leave the line Running with ERROR_CODE 0.
    /// Now `fault_after` deadline ERRs in a row fault it with the deadline's code, and
    /// FAULT_ACK returns to Running only through a new self-test that passes.
    #[test]
    fn sustained_deadline_errors_fault_the_line_and_fault_ack_runs_a_self_test() {
        let self_tests = Arc::new(Mutex::new(Vec::new()));
        let ok = Arc::new(Mutex::new(true));
        let stage = Slow {
            delay: Duration::from_millis(60),
            self_tests: self_tests.clone(),
            self_test_ok: ok.clone(),
        };
        let timing = LineTiming {
            deadline: Duration::from_millis(20),
            fifo: 8,
            auto_online: true,
            fault_after: 3,
            select: None,
        };
        let (h, join) = start(timing, Box::new(stage), vec![], Status::default());
        h.request_self_test();
        let s = wait_for(&h, |s| s.state == LineState::Running);
        assert_eq!(s.state, LineState::Running);
        for _ in 0..4 {
            h.trigger();
            std::thread::sleep(Duration::from_millis(30));
        }
        let s = wait_for(&h, |s| s.state == LineState::Faulted);
        assert_eq!(s.state, LineState::Faulted);
        assert_eq!(s.error_code, ErrCause::Deadline as u16);
        // A failing self-test keeps it Faulted.
        *ok.lock().unwrap() = false;
        std::thread::sleep(Duration::from_millis(300)); // the stage finishes its queue
        h.command(Command::FaultAck);
        let s = wait_for(&h, |s| {
            s.state == LineState::Faulted && self_tests.lock().unwrap().len() == 2
        });
        assert_eq!(
            (s.state, s.error_code),
            (LineState::Faulted, code::SELF_TEST)
        );
        *ok.lock().unwrap() = true;
        h.command(Command::FaultAck);
        let s = wait_for(&h, |s| s.state == LineState::Running);
        assert_eq!((s.state, s.error_code), (LineState::Running, 0));
        assert_eq!(*self_tests.lock().unwrap(), vec![true, false, true]);
        h.shutdown();
        join.join().unwrap();
    }

    /// M2: a vanished port faults the line (error 0x0502); FAULT_ACK is refused while it is
    /// gone and accepted (through the self-test) once it is back.
    #[test]
    fn a_lost_port_faults_the_line_until_it_is_back_and_acknowledged() {
        let stage = Slow {
            delay: Duration::ZERO,
            self_tests: Arc::default(),
            self_test_ok: Arc::new(Mutex::new(true)),
        };
        let (h, join) = start(TIMING_FAST, Box::new(stage), vec![], Status::default());
        h.request_self_test();
        wait_for(&h, |s| s.state == LineState::Running);
        h.health().ports_lost.fetch_or(1, Ordering::SeqCst);
        h.port_lost(Some(code::SERIAL_LOST));
        let s = wait_for(&h, |s| s.state == LineState::Faulted);
        assert_eq!(
            (s.state, s.error_code),
            (LineState::Faulted, code::SERIAL_LOST)
        );
        h.command(Command::FaultAck);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(h.status().state, LineState::Faulted);
        h.health().ports_lost.fetch_and(!1, Ordering::SeqCst);
        h.port_lost(None);
        h.command(Command::FaultAck);
        let s = wait_for(&h, |s| s.state == LineState::Running);
        assert_eq!(s.state, LineState::Running);
        h.shutdown();
        join.join().unwrap();
    }

    /// An I/O fault found at start (GPIO, pinmux) is not cleared by FAULT_ACK (it used to
    /// return the line to Running with the outputs never opened), and a self-test result
    /// that arrives while draining does not take the line out of Draining (SIGTERM would hang).
    #[test]
    fn start_io_faults_are_sticky_and_draining_is_never_left() {
        let stage = Slow {
            delay: Duration::from_millis(100),
            self_tests: Arc::default(),
            self_test_ok: Arc::new(Mutex::new(true)),
        };
        let (h, join) = start(TIMING_FAST, Box::new(stage), vec![], Status::default());
        h.io_fault(code::GPIO);
        let s = wait_for(&h, |s| s.state == LineState::Faulted);
        assert_eq!((s.state, s.error_code), (LineState::Faulted, code::GPIO));
        h.command(Command::FaultAck);
        std::thread::sleep(Duration::from_millis(250));
        let s = h.status();
        assert_eq!((s.state, s.error_code), (LineState::Faulted, code::GPIO));
        h.shutdown();
        h.self_test(Ok(()));
        h.self_test(Err(code::SELF_TEST));
        join.join().unwrap();
    }

    const TIMING_FAST: LineTiming = LineTiming {
        deadline: Duration::from_millis(200),
        fifo: 4,
        auto_online: true,
        fault_after: 3,
        select: None,
    };
}
